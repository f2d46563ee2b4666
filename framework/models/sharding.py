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


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``weight`` (itself when it is a plain tensor)."""
    if not isinstance(weight, DTensor):
        return weight
    grad_placements = [Partial() if p.is_replicate() else p for p in weight.placements]
    return weight.to_local(grad_placements=grad_placements)
