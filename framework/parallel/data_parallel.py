"""Data-parallel wrapping: FSDP2 (``fully_shard`` per block, then the root) or DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from framework.parallel.mesh import ParallelLayout, ParallelMeshes


def wrap_data_parallel(
    model: nn.Module, mode: Literal["ddp", "fsdp"], device: torch.device, meshes: ParallelMeshes
) -> nn.Module:
    """Return the model wrapped for its data-parallel ranks (unchanged when there is only one).

    FSDP2: every block, then the root, sharded over ``meshes.dp`` (2-D for HSDP); under expert parallelism each MoE
    layer's experts first, over ``meshes.efsdp``. FSDP averages expert gradients over that mesh only, which is ``ep``
    times smaller than the data-parallel size: :func:`rescale_expert_gradients` finishes the average.
    DDP: only for pure data parallelism (the config refuses it with tp or ep).
    """
    layout = meshes.layout
    if mode == "ddp":
        if layout.dp == 1:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if meshes.efsdp is not None:
        for layer in model.moe_layers():  # type: ignore[attr-defined]
            experts = getattr(layer, "experts", None)
            if experts is not None:
                fully_shard(experts, mesh=meshes.efsdp)
    if meshes.dp is None:
        return model
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=meshes.dp)
    fully_shard(model, mesh=meshes.dp)
    return model


@torch.no_grad()
def rescale_expert_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """Divide the expert gradients by ``ep`` after the step's backward, so that, like every other gradient, they are
    averaged over all data-parallel ranks (FSDP divided them by the expert-data-parallel size ``dp / ep`` only).

    (FSDP2's ``set_gradient_divide_factor`` would do this inside the reduction, but on gloo it needs a pre-multiplied
    sum gloo lacks, and its sum-only fallback divides twice on a one-rank mesh.)"""
    if layout.ep == 1:
        return
    for layer in model.moe_layers():  # type: ignore[attr-defined]
        experts = getattr(layer, "experts", None)
        for p in experts.parameters() if experts is not None else ():
            if p.grad is not None:
                p.grad.div_(layout.ep)


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
