"""Device-independent deterministic initialisation.

Every value is drawn on the CPU from one ``torch.Generator`` and copied to the parameter, so a model built directly,
or on the meta device then ``to_empty``-ed onto any device, gets bit-identical weights for the same seed.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` in place with ``N(0, std²)`` drawn in fp32 on the CPU from ``generator``."""
    values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    tensor.copy_(values)
    return tensor
