"""How model code reads a weight that parallelism may have turned into a DTensor.

Model modules compute on plain local tensors. Where a parallel plan leaves a weight as a DTensor that the module
uses directly (the MoE router and experts, which see sequence-parallel token slices), :func:`local_weight` gives the
local part; dimensions on which the weight is replicated get *partial* gradients, because every rank of such a
dimension computes on different tokens and the true gradient is their sum (FSDP2, or
:func:`framework.parallel.grads.reduce_pending_gradients` without FSDP, performs that sum).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``weight`` (itself when it is a plain tensor)."""
    if not isinstance(weight, DTensor):
        return weight
    grad_placements = [Partial() if p.is_replicate() else p for p in weight.placements]
    return weight.to_local(grad_placements=grad_placements)


def local_box(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The global index box of this rank's part of ``tensor``: ``whole[box]`` has the local tensor's shape and
    values. A plain tensor is whole (every slice full).

    Sharded initialisation and sharded loading fill a parameter's local shard with the values of a global tensor
    that never exists whole on any rank. Every placement the project's layouts produce (tensor-parallel ``Shard``,
    expert-parallel ``Shard(0)``, FSDP2's ``Shard(0)`` and its strided form on a 2-D mesh, FSDP2's ``Shard(d)`` on a
    hidden dimension of expert tensors with fewer local experts than FSDP ranks, ``Replicate``) leaves a rank holding
    one contiguous box of the global tensor."""
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's values of ``tensor``: the local shard of a DTensor (writing to it writes the parameter), the
    tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
