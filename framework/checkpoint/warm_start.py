"""Start a job from the model weights of an earlier run (``model.init_from``): fine-tuning, adapters on a base.

Only the model's tensors are read (optimizer, scheduler, step and data position start fresh), and only those the
caller asks for (``keys``: the base model's, not the adapters a plugin added). The model may be whole or already
sharded (DTensor parameters of any layout): each rank then reads only its slices, from a native checkpoint (torch
DCP reads the local boxes) or from a Hugging Face folder (:func:`~framework.interop.hf.load_hf_weights`). So the
checkpoint may come from any parallel layout or engine, and from a job with other plugins (tensors the new model
does not have are ignored). A requested tensor the checkpoint lacks, or one whose shape differs, stops the job with
one line naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.export import resolve_checkpoint
from framework.checkpoint.safe_reader import SafeFileSystemReader
from framework.checkpoint.store import CheckpointStore
from framework.comm import collectives as C
from framework.config.errors import ConfigError

KEY = "model.init_from"


def load_model_weights(
    source: str | Path, model: nn.Module, keys: Collection[str] | None = None, read: list[int] | None = None
) -> Path:
    """Fill ``model``'s parameters and persistent buffers from checkpoint ``source`` (a ``step_XXXXXXXX`` folder or a
    run folder: its latest checkpoint), or from a Hugging Face folder given as ``hf:<folder>`` (its safetensors,
    converted by :func:`~framework.interop.hf.load_hf_weights`). ``keys``: the state-dict names to fill (default:
    all of the model's); the others keep their values. ``read``: for a Hugging Face folder, the bytes of tensor data
    this rank read are appended to it. Collective under torch.distributed: every rank calls it. Returns the folder."""
    from framework.interop.hf.job import hf_folder

    folder = hf_folder(str(source))
    if folder is not None:
        from framework.interop.hf import load_hf_weights

        with torch.no_grad():
            stats = load_hf_weights(model, folder, keys=keys)
        if read is not None:
            read.append(stats.bytes_read)
        return folder
    try:
        path = resolve_checkpoint(source)
    except FileNotFoundError as exc:
        raise ConfigError(KEY, str(source), str(exc)) from None
    CheckpointStore.read_meta(path)
    target = _targets(model, keys, source)
    _check_stored(path, target, source)
    nested = {"model": dict(target)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, storage_reader=SafeFileSystemReader(str(path)), no_dist=not C.is_distributed())
    with torch.no_grad():  # DCP loads in place; copy anyway in case a tensor was replaced rather than filled
        for name, value in target.items():
            loaded = nested["model"][name]
            if loaded is not value:
                value.copy_(loaded)
    return path


def _targets(model: nn.Module, keys: Collection[str] | None, source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors to fill, by checkpoint name (``torch.compile``'s ``_orig_mod.`` taken out of a block's names)."""
    state = {name.replace("._orig_mod.", "."): t for name, t in model.state_dict().items()}
    if keys is None:
        return state
    unknown = sorted(set(keys) - set(state))
    if unknown:
        raise ConfigError(KEY, str(source), f"asked to load '{unknown[0]}', which the model does not have")
    return {name: t for name, t in state.items() if name in keys}


def _check_stored(path: Path, target: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every target is in the checkpoint with the same shape (read from its metadata, no tensor data)."""
    stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, tensor in target.items():
        meta = stored.get(f"model.{name}")
        if not isinstance(meta, TensorStorageMetadata):
            raise ConfigError(
                KEY, str(source), f"the checkpoint has no tensor '{name}': the model and moe sections must describe "
                "the model that was saved (compare with config.yaml of that run)"
            )  # fmt: skip
        if tuple(meta.size) != tuple(tensor.shape):
            raise ConfigError(
                KEY, str(source), f"'{name}' has shape {tuple(meta.size)} in the checkpoint and {tuple(tensor.shape)} "
                "in this model: the model and moe sections must match the saved run's"
            )  # fmt: skip
