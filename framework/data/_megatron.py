"""Quiet, lazy access to megatron-core's dataset modules.

Importing ``megatron.core`` on a CPU machine takes ~4 s and emits, on import, ``UserWarning``s that Transformer Engine
and Apex are missing (from ``megatron.core.optimizer``, ``megatron.core.optimizer.optimizer``,
``megatron.core.optimizer.clip_grads``, ``megatron.core.distributed.fsdp...mixed_precision``), a torch
``DeprecationWarning`` about ``torch.jit.script_method`` and INFO records from ``megatron.core.distributed.fsdp``.
While building datasets it logs INFO/WARNING records through ``logging.getLogger("megatron.core.datasets.*")``.

The dataset modules need little of it: ``megatron/core/__init__.py`` is what pulls in tensor parallelism, the
optimizers and Transformer Engine probes (~3.5 of the ~4 s, paid by every rank of every run).
:func:`_import_package_lazily` therefore registers the ``megatron.core`` package without running its ``__init__``
(submodules import as usual) and runs it the first time anything reads an attribute the package itself defines, so
other code that imports ``megatron.core`` later still gets the whole package.

This module imports it only when data is built, with every warning raised during the import ignored (the filter is
scoped to the import, not global), and sets the ``megatron`` logger (the parent of all of megatron-core's loggers) to
ERROR so none of its progress chatter reaches the console. Errors still do.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from types import ModuleType, SimpleNamespace
from typing import Any

_MODULES: SimpleNamespace | None = None

QUIET_LOGGERS: tuple[str, ...] = ("megatron",)
"""Loggers set to ERROR when megatron-core is first imported through :func:`megatron_datasets`."""


def quiet_megatron_logs() -> None:
    """Set megatron-core's loggers to ERROR (idempotent)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("megatron."):
            logger = logging.getLogger(name)
            if logger.level not in (logging.NOTSET, logging.ERROR, logging.CRITICAL):
                logger.setLevel(logging.ERROR)


def megatron_datasets() -> SimpleNamespace:
    """The megatron-core dataset classes, imported once, quietly.

    Returns a namespace with ``IndexedDataset``, ``IndexedDatasetBuilder``, ``DType``, ``BlendedDataset``,
    ``BlendedMegatronDatasetBuilder``, ``GPTDataset``, ``GPTDatasetConfig``.
    """
    global _MODULES
    if _MODULES is None:
        quiet_megatron_logs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _import_package_lazily()
            from megatron.core.datasets.blended_dataset import BlendedDataset
            from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
            from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
            from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
        quiet_megatron_logs()
        _MODULES = SimpleNamespace(
            IndexedDataset=IndexedDataset,
            IndexedDatasetBuilder=IndexedDatasetBuilder,
            DType=DType,
            BlendedDataset=BlendedDataset,
            BlendedMegatronDatasetBuilder=BlendedMegatronDatasetBuilder,
            GPTDataset=GPTDataset,
            GPTDatasetConfig=GPTDatasetConfig,
        )
    return _MODULES


def _import_package_lazily() -> None:
    """Register ``megatron.core`` with its ``__init__`` deferred (see the module docstring); a no-op when it is
    already imported or cannot be found that way (then the normal import runs)."""
    if "megatron.core" in sys.modules:
        return
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)

    def complete(name: str) -> Any:
        """A submodule (``from megatron.core import parallel_state``) comes from ``sys.modules`` or is left to the
        import system; anything else runs the real ``__init__`` into the registered module once."""
        submodule = sys.modules.get(f"megatron.core.{name}")
        if submodule is not None:
            return submodule
        if importlib.util.find_spec(f"megatron.core.{name}") is not None:
            raise AttributeError(name)  # ``from megatron.core import x`` then imports submodule x
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["megatron.core"] = package
    sys.modules["megatron"].core = package  # type: ignore[attr-defined]  # what the import system would set
    try:
        import megatron.core.parallel_state  # noqa: F401 - first: megatron.core.utils and it import each other
    except Exception:
        for name in [n for n in sys.modules if n == "megatron.core" or n.startswith("megatron.core.")]:
            del sys.modules[name]
        del sys.modules["megatron"].core  # type: ignore[attr-defined]


def _is_lazy(module: ModuleType) -> bool:
    """True while ``module`` (``megatron.core``) has not run its ``__init__`` yet."""
    return "__getattr__" in module.__dict__
