"""A checkpoint's model as an export needs it, without its frozen base weights in memory.

The job's model is built on the ``meta`` device and transformed by its plugins there
(:func:`~framework.train.assembly.transform_and_select`, the assembly's own step), so every module, name, shape and
dtype is the trained model's. Only the tensors an export reads are then allocated on the CPU and read from the
checkpoint: every tensor a plugin added (adapters, masks, their buffers), every trainable parameter (e.g.
``modules_to_save`` or fully trained modules) and what a plugin declares with ``expertrain_export_tensors``;
the plugins' own state is restored into that model. The frozen base weights stay on ``meta``: an export that
reads one it did not declare gets :class:`ExportReadsBaseWeight`, naming the plugin and the hook to declare it
with. Base tensors are read later one at a time (:meth:`PartialModel.load`), as the streamed writers need them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.checkpoint.safe_reader import CheckpointFormatError
from framework.checkpoint.store import CheckpointStore
from framework.checkpoint.stream import CheckpointTensors
from framework.config import JobConfig
from framework.hooks import PluginError, PluginManager
from framework.hooks.errors import PluginHookError
from framework.models import Transformer

TIED = ("tok_embeddings.weight", "output.weight")
"""The state-dict names a tied head shares (a checkpoint may keep one copy)."""


class ExportReadsBaseWeight(PluginError):
    """A plugin's export read a frozen base weight that the streamed export left unloaded."""


class PartialModel:
    """The job's model with only the tensors an export reads in memory (see the module docstring).

    ``model``: the transformed model, frozen base weights on ``meta``; ``base``: the job's model before plugin
    transforms, on ``meta`` (the tensors a merged export writes); ``loaded``: the state-dict names in memory."""

    def __init__(
        self,
        path: Path,
        config: JobConfig,
        pm: PluginManager,
        export_format: str,
        *,
        plugin_state: bool = True,
    ) -> None:
        from framework.train.assembly import transform_and_select

        self.path, self.config, self.pm = path, config, pm
        with torch.device("meta"):
            self.base = Transformer(config.model, config.moe, pm.registry)
            model = Transformer(config.model, config.moe, pm.registry)
        base_ids = {id(t) for t in _tensors(model)}
        transform_and_select(model, config, pm)
        self.model = model
        declared = _declared_tensors(pm, model, config, export_format)
        self.shapes = {name: t.shape for name, t in model.state_dict().items()}
        self.dtypes = {name: t.dtype for name, t in model.state_dict().items()}
        self.tensors = CheckpointTensors(path)
        self._check_against_checkpoint()
        state = dict(model.state_dict(keep_vars=True))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        wanted = {id(t) for name, t in state.items() if name in declared}
        wanted |= trainable | {id(t) for t in _tensors(model) if id(t) not in base_ids}
        _materialise(model, wanted)
        state = dict(model.state_dict(keep_vars=True))
        self.loaded = [name for name, t in state.items() if not t.is_meta]
        self._load_values(state, plugin_state)
        model.eval()

    def _check_against_checkpoint(self) -> None:
        stored = self.tensors.shapes
        for name, shape in self.shapes.items():
            source = self.source_name(name)
            if stored.get(source) != shape:
                found = f"shape {tuple(stored[source])}" if source in stored else "no such tensor"
                raise CheckpointFormatError(
                    f"{self.path} does not hold the model its job describes: '{source}' should be "
                    f"{tuple(shape)}, found {found}; export the checkpoint with the job config it was saved with"
                )

    def source_name(self, name: str) -> str:
        """Where the checkpoint keeps our tensor ``name`` (a tied head may be saved once, as the embedding)."""
        if name == TIED[1] and self.config.model.tie_embeddings and name not in self.tensors.shapes:
            return TIED[0]
        return name

    def _load_values(self, state: dict[str, torch.Tensor], plugin_state: bool) -> None:
        targets: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name in self.loaded:
            if id(state[name]) not in seen:
                seen.add(id(state[name]))
                targets[self.source_name(name)] = state[name]
        target: dict[str, Any] = {"model": targets}
        if plugin_state:
            with reading_base_weights_is_an_error("expertrain_state_dict"):
                target["plugins"] = self.pm.plugin_state_dicts(self.model, self.config)
        with torch.no_grad():
            loaded, _, _ = CheckpointStore.load(self.path, target)
        if plugin_state:
            with reading_base_weights_is_an_error("expertrain_load_state_dict"):
                self.pm.load_plugin_state_dicts(loaded.get("plugins", {}), self.model, self.config)

    def load(self, name: str) -> torch.Tensor:
        """Our tensor ``name`` whole, in the model's dtype: from memory when loaded, else read from the checkpoint."""
        held = self.model.state_dict(keep_vars=True)[name]
        if not held.is_meta:
            return held.detach()
        source = self.source_name(name)
        return self.tensors.load([source], self.dtypes[name])[source]


def _declared_tensors(pm: PluginManager, model: nn.Module, config: JobConfig, export_format: str) -> set[str]:
    """The base tensors the plugins' exports read (``expertrain_export_tensors``), checked to be the model's."""
    names = set(model.state_dict())
    declared: set[str] = set()
    answers = pm.call_per_plugin(
        "expertrain_export_tensors", model=model, config=config, export_format=export_format
    )
    for plugin, listed in answers.items():
        unknown = sorted(set(listed) - names)
        if unknown:
            raise PluginError(
                f"plugin '{plugin}' named '{unknown[0]}' in expertrain_export_tensors, which the model does not "
                "have: name the model's state-dict keys"
            )
        declared |= set(listed)
    return declared


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer (persistent or not) of ``model``, shared ones once per owner."""
    for module in model.modules():
        yield from (p for p in module._parameters.values() if p is not None)
        yield from (b for b in module._buffers.values() if b is not None)


def _materialise(model: nn.Module, ids: Collection[int]) -> None:
    """Give the tensors ``ids`` (parameters and buffers on meta) CPU storage, zero-filled until loaded; a tensor
    that several modules share (a tied head) stays shared."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, old in store.items():
                if old is None or id(old) not in ids:
                    continue
                if id(old) not in made:
                    data = torch.zeros(old.shape, dtype=old.dtype, device="cpu")
                    made[id(old)] = (
                        nn.Parameter(data, requires_grad=old.requires_grad)
                        if isinstance(old, nn.Parameter)
                        else data
                    )
                store[key] = made[id(old)]


@contextmanager
def reading_base_weights_is_an_error(hook: str) -> Iterator[None]:
    """Turn torch's error for reading a ``meta`` tensor's data inside a plugin hook (as the plugin manager reports
    it, or raised directly) into one line naming the plugin, the hook and how to declare the weight."""
    try:
        yield
    except (PluginHookError, NotImplementedError, RuntimeError) as exc:
        original = exc.original if isinstance(exc, PluginHookError) else exc
        if not isinstance(original, (NotImplementedError, RuntimeError)) or "meta" not in str(original):
            raise
        who = f"plugin '{exc.plugin}'" if isinstance(exc, PluginHookError) else "a plugin"
        raise ExportReadsBaseWeight(
            f"{who} read a frozen base weight in {hook}, which a streamed export does not load ({original}); "
            "export with --whole-model (whole_model=True) to rebuild the whole model instead; the plugin should name "
            "the base tensors its export reads with expertrain_export_tensors"
        ) from None
