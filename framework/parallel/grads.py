"""Finish gradients that tensor parallelism leaves as pending sums.

A weight replicated over the tensor-parallel ranks but applied to different tokens on each (sequence-parallel norms,
the MoE router, whole experts under ``etp = 1``) gets a ``Partial`` gradient: each rank holds its tokens' share.
FSDP2 sums those shares when it reduces gradients; without FSDP (one data-parallel rank) this does it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def reduce_pending_gradients(parameters: Iterable[torch.nn.Parameter]) -> int:
    """Redistribute every ``Partial`` DTensor gradient to its parameter's placements; returns how many changed.

    Every rank must call it with the same parameters in the same order (each change is a collective)."""
    changed = 0
    for p in parameters:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)
            changed += 1
    return changed
