"""Data-parallel wrapping: FSDP2 (``fully_shard`` per block, then the root) or DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def wrap_data_parallel(
    model: nn.Module, mode: Literal["ddp", "fsdp"], device: torch.device, world_size: int
) -> nn.Module:
    """Return the model wrapped for ``world_size`` data-parallel ranks (unchanged when there is one rank)."""
    if world_size == 1:
        return model
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction on micro-batches that are not the last of a step."""
    if isinstance(model, DistributedDataParallel):
        ctx = contextlib.nullcontext() if enabled else model.no_sync()
        with ctx:
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)
    yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
