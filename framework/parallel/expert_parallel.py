"""Expert parallelism: each of ``ep`` ranks keeps ``E / ep`` consecutive experts and tokens travel by all-to-all.

Applied after the full model is initialised (so every layout starts from the same weights) and before FSDP:

- the experts' fused weights are cut to this rank's slice, as DTensors ``Shard(0)`` on the expert-parallel mesh
  (checkpoints then reshard between layouts) or as plain tensors (``as_dtensor=False``, for engines such as
  DeepSpeed that reduce expert gradients themselves);
- the layer's dispatcher becomes an :class:`~framework.models.moe.dispatch.AllToAllDispatcher` on the same ranks.

Expert gradients are reduced over the ranks holding the same experts only (FSDP over the ``efsdp`` mesh); the
routers' and every dense weight's gradients over all data-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from framework.models.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from framework.models.moe.experts import GroupedExperts
from framework.parallel.mesh import ParallelMeshes


def expert_slice(num_experts: int, ep_rank: int, ep_size: int) -> slice:
    """The global expert ids held by ``ep_rank``."""
    per_rank = num_experts // ep_size
    return slice(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def _per_expert_parameters(experts: GroupedExperts) -> list[str]:
    """Further per-expert tensors (dim 0 = experts) a subclass declares with ``per_expert_parameters()``, e.g.
    LoRA deltas: cut over ``ep`` like the fused weights, kept whole (replicated) over ``tp``. A declared name may
    also be a buffer (e.g. a per-expert mask): it is cut and wrapped the same way and stays a buffer."""
    declare = getattr(experts, "per_expert_parameters", None)
    return list(declare()) if declare is not None else []


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` (dotted) of ``module``."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    return owner.get_buffer(leaf)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    """Replace parameter ``name`` by ``nn.Parameter(value)``, or buffer ``name`` by ``value`` (persistence kept)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    if leaf in owner._parameters:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=requires_grad))
    else:
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)


@torch.no_grad()
def shard_experts_(experts: GroupedExperts, ep_mesh: DeviceMesh, as_dtensor: bool = True) -> None:
    """Replace the full ``[E, ...]`` weights by this rank's ``[E / ep, ...]`` slice (in place, same names)."""
    ep_rank, ep_size = ep_mesh.get_local_rank(), ep_mesh.size()
    keep = expert_slice(experts.num_experts, ep_rank, ep_size)
    for name in ("gate_up_proj", "down_proj", *_per_expert_parameters(experts)):
        full = _get_tensor(experts, name)
        if isinstance(full, DTensor):
            raise RuntimeError(f"experts.{name} is already distributed; apply expert parallelism once")
        local = full.detach()[keep].clone()
        value = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False) if as_dtensor else local
        _set_tensor(experts, name, value, full.requires_grad)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, as_dtensor: bool = True) -> int:
    """Shard the experts of every MoE layer of ``model`` over ``ep_mesh``; returns how many layers changed.

    A layer qualifies when it has ``experts`` (:class:`GroupedExperts`) and a :class:`LocalDispatcher`; plugin MoE
    blocks with other parts do their own wiring in ``expertrain_after_parallelize``.
    """
    layers = _builtin_moe_layers(model)
    for layer in layers:
        shard_experts_(layer.experts, ep_mesh, as_dtensor)
        _dispatch_over(layer, ep_mesh)
    return len(layers)


def _builtin_moe_layers(model: nn.Module) -> list[nn.Module]:
    """MoE layers made of built-in parts: :class:`GroupedExperts` behind a :class:`LocalDispatcher`."""
    return [
        layer
        for layer in model.moe_layers()  # type: ignore[attr-defined]
        if isinstance(getattr(layer, "experts", None), GroupedExperts)
        and isinstance(getattr(layer, "dispatcher", None), LocalDispatcher)
    ]


def _dispatch_over(layer: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replace the layer's local dispatcher by an all-to-all one over ``ep_mesh`` with the same capacity rules."""
    local = layer.dispatcher
    layer.dispatcher = AllToAllDispatcher(
        layer.experts.num_experts, ep_mesh.get_group(), local.capacity_factor, local.drop_policy
    )


def _shard_expert_weights_(
    experts: GroupedExperts, meshes: ParallelMeshes, expert_tensor_parallel: bool
) -> None:
    """Cut this rank's part of the fused expert weights and wrap it as a DTensor on the experts' mesh.

    Placements: ``Shard(0)`` over ``ep``; over ``tp`` either ``Replicate`` (whole experts) or the hidden dimension
    ``I``: ``Shard(2)`` of ``gate_up_proj [E, 2, I, H]`` (rank ``r`` keeps gate and up units ``r·I/tp … (r+1)·I/tp``)
    and of ``down_proj [E, H, I]`` (the matching columns). Declared per-expert parameters (adapters):
    ``Shard(0)`` over ``ep``, ``Replicate`` over ``tp``.
    """
    layout = meshes.layout
    dims: list[tuple[str, int, int]] = []  # (name, rank, size) of the mesh dims, outermost first
    if layout.ep > 1:
        dims.append(("ep", meshes.ep.get_local_rank(), layout.ep))  # type: ignore[union-attr]
    if layout.tp > 1:
        dims.append(("tp", meshes.tp.get_local_rank(), layout.tp))  # type: ignore[union-attr]
    mesh = meshes.ep_tp if len(dims) == 2 else meshes.ep if layout.ep > 1 else meshes.tp
    assert mesh is not None
    with torch.no_grad():
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        gate_up_placements: list[Placement] = []
        down_placements: list[Placement] = []
        for name, rank, size in dims:
            if name == "ep":
                keep = expert_slice(experts.num_experts, rank, size)
                gate_up, down = gate_up[keep], down[keep]
                gate_up_placements.append(Shard(0))
                down_placements.append(Shard(0))
            elif expert_tensor_parallel:
                hidden = experts.hidden // size
                cols = slice(rank * hidden, (rank + 1) * hidden)
                gate_up, down = gate_up[:, :, cols], down[:, :, cols]
                gate_up_placements.append(Shard(2))
                down_placements.append(Shard(2))
            else:
                gate_up_placements.append(Replicate())
                down_placements.append(Replicate())
        for name, local, placements in (
            ("gate_up_proj", gate_up, gate_up_placements),
            ("down_proj", down, down_placements),
        ):
            old = getattr(experts, name)
            value = DTensor.from_local(local.contiguous().clone(), mesh, placements, run_check=False)
            setattr(experts, name, nn.Parameter(value, requires_grad=old.requires_grad))
        for name in _per_expert_parameters(experts):
            old = _get_tensor(experts, name)
            local, placements = old.detach(), []
            for dim_name, rank, size in dims:
                if dim_name == "ep":
                    local = local[expert_slice(experts.num_experts, rank, size)]
                placements.append(Shard(0) if dim_name == "ep" else Replicate())
            value = DTensor.from_local(local.contiguous().clone(), mesh, placements, run_check=False)
            _set_tensor(experts, name, value, old.requires_grad)


def _replicate_over_tp_(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Turn ``module``'s parameters into DTensors replicated over ``tp`` (e.g. the router: every tensor-parallel
    rank routes its own sequence slice with the same weights; gradients are summed over the slices)."""
    for name, param in list(module.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            continue
        value = DTensor.from_local(param.detach(), tp_mesh, [Replicate()], run_check=False)
        setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))
    for child in module.children():
        _replicate_over_tp_(child, tp_mesh)


def parallelize_moe(model: nn.Module, meshes: ParallelMeshes) -> int:
    """Place every built-in MoE layer of ``model`` on the layout's ``ep`` and ``tp`` ranks; returns how many.

    - router(s) and any other part of the layer except the routed experts (e.g. a plugin's shared experts):
      replicated over ``tp`` (each rank works on its sequence slice; read the weights with
      :func:`~framework.models.sharding.local_weight`);
    - experts: ``E / ep`` per rank, each either split over ``tp`` on its hidden dimension (``etp == tp``) or whole
      (``etp == 1``); see :func:`_shard_expert_weights_`;
    - dispatcher: :class:`AllToAllDispatcher` over ``ep`` when ``ep > 1``.

    Call after the model is initialised and after the dense tensor-parallel plan, before FSDP. Plugin MoE blocks
    qualify when they subclass :class:`~framework.models.moe.layer.MoELayer` (keeping its ``experts`` and
    ``dispatcher``).
    """
    layout = meshes.layout
    if layout.ep == 1 and layout.tp == 1:
        return 0
    expert_tp = layout.tp > 1 and layout.etp > 1
    layers = _builtin_moe_layers(model)
    for layer in layers:
        if meshes.tp is not None:  # routers, shared experts, gates: every part but the routed experts
            for child in layer.children():
                if child is not layer.experts:
                    _replicate_over_tp_(child, meshes.tp)
        _shard_expert_weights_(layer.experts, meshes, expert_tp)
        layer.expert_tensor_parallel = expert_tp
        if meshes.ep is not None:
            _dispatch_over(layer, meshes.ep)
    return len(layers)
