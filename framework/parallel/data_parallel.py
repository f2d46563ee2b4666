"""Data-parallel wrapping: FSDP2 (``fully_shard`` per block, then the root) or DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from framework.config.sections import ParallelConfig
from framework.parallel.mesh import ParallelLayout, ParallelMeshes

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Config names of the FSDP2 precision options (``parallel.param_dtype`` / ``parallel.reduce_dtype``)."""


@dataclass(frozen=True)
class FSDPPolicy:
    """FSDP2's memory and precision options, passed to every ``fully_shard`` call (blocks, root, experts).

    The sharded parameters, their gradients and the optimizer state always stay fp32 (the master weights):
    ``param_dtype`` is the dtype of the unsharded (all-gathered) parameters, hence of the blocks' compute and of the
    parameter all-gather; ``reduce_dtype`` that of the gradient reduce-scatter (and of gradient accumulation across
    micro-batches that skip the reduction); ``cpu_offload`` keeps the sharded parameters, gradients and optimizer
    state in host memory (FSDP2's ``CPUOffloadPolicy``), copying each block's shard to the device for its all-gather.
    """

    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    cpu_offload: bool = False

    @classmethod
    def from_config(cls, parallel: ParallelConfig) -> FSDPPolicy:
        """The policy of ``parallel.param_dtype`` / ``reduce_dtype`` / ``cpu_offload``."""
        return cls(DTYPES[parallel.param_dtype], DTYPES[parallel.reduce_dtype], parallel.cpu_offload)

    @property
    def is_default(self) -> bool:
        """Plain fp32 FSDP2 with everything on the device: nothing to pass to ``fully_shard``."""
        return self == FSDPPolicy()

    def fully_shard_kwargs(self, device: torch.device) -> dict[str, Any]:
        """``mp_policy`` and ``offload_policy`` for ``fully_shard`` on ``device`` (none for the default policy).

        An fp32 ``param_dtype`` is passed as ``None``: with a dtype, FSDP2 would also cast every wrapped module's
        floating-point inputs to it. Host memory is pinned only for a CUDA device (pinning needs an accelerator)."""
        if self.is_default:
            return {}
        param_dtype = None if self.param_dtype == torch.float32 else self.param_dtype
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        return {
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.reduce_dtype),
            "offload_policy": offload,
        }


def wrap_data_parallel(
    model: nn.Module,
    mode: Literal["ddp", "fsdp"],
    device: torch.device,
    meshes: ParallelMeshes,
    *,
    policy: FSDPPolicy | None = None,
) -> nn.Module:
    """Return the model wrapped for its data-parallel ranks (unchanged when there is only one).

    FSDP2: every block, then the root, sharded over ``meshes.dp`` (2-D for HSDP); under expert parallelism each MoE
    layer's experts first, over ``meshes.efsdp``. FSDP averages expert gradients over that mesh only, which is ``ep``
    times smaller than the data-parallel size: :func:`rescale_expert_gradients` finishes the average. ``policy``
    (FSDP2 only; default plain fp32): mixed precision and CPU offload, the same for every ``fully_shard`` call.
    DDP: only for pure data parallelism (the config refuses it with tp or ep).
    """
    policy = policy or FSDPPolicy()
    layout = meshes.layout
    if not policy.is_default and (mode != "fsdp" or meshes.dp is None):
        raise ValueError(
            f"FSDP2 precision/offload options need parallel.data=fsdp over 2 or more data-parallel ranks "
            f"(got parallel.data={mode}, {layout.dp} data-parallel rank(s)); leave parallel.param_dtype, "
            "reduce_dtype and cpu_offload at their defaults"
        )
    if mode == "ddp":
        if layout.dp == 1:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    kwargs = policy.fully_shard_kwargs(device)
    if meshes.efsdp is not None:
        for layer in model.moe_layers():  # type: ignore[attr-defined]
            experts = getattr(layer, "experts", None)
            if experts is not None:
                fully_shard(experts, mesh=meshes.efsdp, **kwargs)
    if meshes.dp is None:
        return model
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=meshes.dp, **kwargs)
    fully_shard(model, mesh=meshes.dp, **kwargs)
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
