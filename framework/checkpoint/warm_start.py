"""Start a job from the model weights of an earlier run (``model.init_from``): fine-tuning, adapters on a base.

Only the model's tensors are read (optimizer, scheduler, step and data position start fresh). They are loaded into
the freshly built, unsharded model before any plugin transforms it, so the checkpoint may come from any parallel
layout or engine, and from a job with other plugins (tensors the new model does not have are ignored). A parameter
the checkpoint lacks, or one whose shape differs, stops the job with one line naming it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.export import resolve_checkpoint
from framework.checkpoint.safe_reader import SafeFileSystemReader
from framework.checkpoint.store import CheckpointStore
from framework.config.errors import ConfigError
from framework.parallel import collectives as C

KEY = "model.init_from"


def load_model_weights(source: str | Path, model: nn.Module) -> Path:
    """Fill ``model``'s parameters and persistent buffers from checkpoint ``source`` (a ``step_XXXXXXXX`` folder or a
    run folder: its latest checkpoint), or from a Hugging Face folder given as ``hf:<folder>`` (its safetensors,
    converted by :func:`~framework.interop.hf.load_hf_weights`). Collective under torch.distributed: every rank
    calls it. Returns the folder."""
    from framework.interop.hf.job import hf_folder

    folder = hf_folder(str(source))
    if folder is not None:
        from framework.interop.hf import load_hf_weights

        with torch.no_grad():
            load_hf_weights(model, folder)
        return folder
    try:
        path = resolve_checkpoint(source)
    except FileNotFoundError as exc:
        raise ConfigError(KEY, str(source), str(exc)) from None
    CheckpointStore.read_meta(path)
    reader = SafeFileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    target = {f"model.{name}": t for name, t in model.state_dict().items()}
    for key, tensor in target.items():
        meta = stored.get(key)
        name = key.removeprefix("model.")
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
    nested = {"model": dict(model.state_dict())}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, storage_reader=SafeFileSystemReader(str(path)), no_dist=not C.is_distributed())
    with torch.no_grad():  # DCP loads in place; copy anyway in case a tensor was replaced rather than filled
        for name, value in model.state_dict().items():
            loaded = nested["model"][name]
            if loaded is not value:
                value.copy_(loaded)
    return path
