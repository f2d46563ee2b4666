"""Data-parallel wrapping: FSDP2 (``fully_shard`` per MoE layer's experts, per block, the embedding, the final norm
with the head, then the root) or DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
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


def expert_shard_placement(param: torch.Tensor, shard_size: int) -> Shard | None:
    """Where FSDP2 cuts an expert tensor over ``shard_size`` ranks: ``None`` (its default, ``Shard(0)``) when the
    local experts (dim 0 after expert parallelism) divide evenly over the ranks, else ``Shard(d)`` on the largest
    other dimension ``d`` that they do divide and that tensor parallelism does not already cut.

    With fewer local experts than FSDP ranks (Mixtral's 8 experts at ``ep=8`` on 16 ranks: one expert per rank,
    FSDP-sharded over 2), a ``Shard(0)`` cut is padded: one rank keeps a whole expert, the other nothing. Cutting the
    hidden dimension instead gives every rank an equal share of every expert (FSDP2 supports only even cuts on a
    dimension other than 0; where none divides, ``Shard(0)`` stays)."""
    local = param.to_local() if isinstance(param, DTensor) else param
    shape = tuple(local.shape)
    if len(shape) < 2 or shape[0] % shard_size == 0:
        return None
    cut = {getattr(p, "dim", None) for p in param.placements} if isinstance(param, DTensor) else set()
    even = [d for d in range(1, len(shape)) if d not in cut and shape[d] % shard_size == 0]
    if not even:
        return None
    return Shard(max(even, key=lambda d: (shape[d], -d)))


def _experts_placement_fn(
    modules: list[nn.Module], shard_size: int
) -> Callable[[nn.Parameter], Shard | None] | None:
    """FSDP2's ``shard_placement_fn`` for the expert tensors of ``modules`` (``None`` where every one keeps
    ``Shard(0)``): :func:`expert_shard_placement` for them, the default for every other parameter."""
    placements = {
        id(p): placement
        for module in modules
        for p in module.parameters()
        if (placement := expert_shard_placement(p, shard_size)) is not None
    }
    if not placements:
        return None
    return lambda param: placements.get(id(param))


def _layer_experts(model: nn.Module) -> list[nn.Module]:
    """The routed experts module of every MoE layer of ``model``."""
    moe_layers = getattr(model, "moe_layers", None)
    layers = moe_layers() if moe_layers is not None else []
    return [e for layer in layers if (e := getattr(layer, "experts", None)) is not None]


def wrap_data_parallel(
    model: nn.Module,
    mode: Literal["ddp", "fsdp"],
    device: torch.device,
    meshes: ParallelMeshes,
    *,
    policy: FSDPPolicy | None = None,
) -> nn.Module:
    """Return the model wrapped for its data-parallel ranks (unchanged when there is only one).

    FSDP2 units, innermost first: under expert parallelism each MoE layer's experts, over ``meshes.efsdp``; every
    block over ``meshes.dp`` (2-D for HSDP); the token embedding; the final norm with the LM head; the root (what
    is left: a tied embedding and head, plugins' model-level parameters). Expert tensors whose local experts do not
    divide evenly over their FSDP ranks are cut on a hidden dimension (:func:`expert_shard_placement`). The
    embedding is its own unit so that it is gathered only for its forward and backward, not for the whole step; the
    head's unit is kept gathered from its forward to its backward (that comes next) and reduce-scatters its
    gradient as soon as its backward ends. FSDP averages expert gradients over ``efsdp`` only, which is ``ep``
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
        for experts in _layer_experts(model):
            placement_fn = _experts_placement_fn([experts], layout.efsdp)
            fully_shard(experts, mesh=meshes.efsdp, shard_placement_fn=placement_fn, **kwargs)
    if meshes.dp is None:
        return model
    all_experts = _layer_experts(model)
    for block in getattr(model, "layers", []):
        # Without expert parallelism the experts are sharded with their block, over all dp_shard ranks.
        inside = {id(m) for m in block.modules()}
        experts = [e for e in all_experts if id(e) in inside]
        placement_fn = None if layout.ep > 1 else _experts_placement_fn(experts, layout.dp_shard)
        fully_shard(block, mesh=meshes.dp, shard_placement_fn=placement_fn, **kwargs)
    embedding, norm, head = (getattr(model, n, None) for n in ("tok_embeddings", "norm", "output"))
    if embedding is not None and head is not None and head.weight is not embedding.weight:
        fully_shard(embedding, mesh=meshes.dp, **kwargs)
        fully_shard(
            [m for m in (norm, head) if m is not None], mesh=meshes.dp, reshard_after_forward=False, **kwargs
        )
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
