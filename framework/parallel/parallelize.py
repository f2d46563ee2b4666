"""The parallelisation order, in one place: tensor parallelism → expert parallelism (and expert tensor parallelism)
→ activation checkpointing → compile → FSDP2 / HSDP, or the plain expert slices the DeepSpeed engine reduces itself.

Every step only wraps or re-places parameters, so it runs on the meta device as well as on materialised weights:
the model assembly (:mod:`framework.train.assembly`) parallelises a meta model and then allocates only this rank's
shards. DDP is the exception: it broadcasts real weights when it wraps, so :func:`wrap_replicated` runs after the
weights exist.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.config import JobConfig
from framework.parallel.data_parallel import FSDPPolicy, wrap_data_parallel
from framework.parallel.expert_parallel import apply_expert_parallel, parallelize_moe
from framework.parallel.mesh import ParallelMeshes


def parallelize_model(
    model: nn.Module, config: JobConfig, meshes: ParallelMeshes, device: torch.device
) -> None:
    """Place ``model`` (a :class:`~framework.models.Transformer`, after plugin transforms) on this rank's share of the
    layout, in place. FSDP2 shards here (native engine, ``parallel.data: fsdp``); DDP does not (see
    :func:`wrap_replicated`); the DeepSpeed engine shards the rest itself."""
    if meshes.tp is not None:
        from framework.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, meshes.tp, meshes.layout.sequence_parallel)
    native = config.train.engine == "native"
    if native:
        parallelize_moe(model, meshes)
    elif meshes.ep is not None:  # DeepSpeed reduces plain expert slices itself (tp is 1 there)
        apply_expert_parallel(model, meshes.ep, as_dtensor=False)
    if config.train.activation_checkpointing:
        model.enable_activation_checkpointing()  # type: ignore[operator]
    if config.train.compile:
        for i, block in enumerate(model.layers):  # type: ignore[union-attr, arg-type]
            model.layers[i] = torch.compile(block)  # type: ignore[index, operator]
    if native and config.parallel.data == "fsdp":
        wrap_data_parallel(model, "fsdp", device, meshes, policy=FSDPPolicy.from_config(config.parallel))


def wrap_replicated(
    model: nn.Module, config: JobConfig, meshes: ParallelMeshes, device: torch.device
) -> nn.Module:
    """The module the engine trains: DDP around ``model`` for ``parallel.data: ddp`` on several ranks (call once the
    weights exist: DDP broadcasts them), else ``model`` itself."""
    if config.train.engine == "native" and config.parallel.data == "ddp":
        return wrap_data_parallel(model, "ddp", device, meshes)
    return model
