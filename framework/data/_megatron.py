"""Quiet, lazy access to megatron-core's dataset modules.

Importing ``megatron.core`` on a CPU machine takes ~4 s and emits, on import, ``UserWarning``s that Transformer Engine
and Apex are missing (from ``megatron.core.optimizer``, ``megatron.core.optimizer.optimizer``,
``megatron.core.optimizer.clip_grads``, ``megatron.core.distributed.fsdp...mixed_precision``), a torch
``DeprecationWarning`` about ``torch.jit.script_method`` and INFO records from ``megatron.core.distributed.fsdp``.
While building datasets it logs INFO/WARNING records through ``logging.getLogger("megatron.core.datasets.*")``.

This module imports it only when data is built, with every warning raised during the import ignored (the filter is
scoped to the import, not global), and sets the ``megatron`` logger (the parent of all of megatron-core's loggers) to
ERROR so none of its progress chatter reaches the console. Errors still do.
"""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

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
