"""The dense SwiGLU feed-forward network (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.init import normal_


class FeedForward(nn.Module):
    """SwiGLU MLP with the transformers Llama parameter names (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Input projections ``N(0, init_std)``; the output projection ``N(0, out_std)``."""
        normal_(self.gate_proj.weight, init_std, generator)
        normal_(self.up_proj.weight, init_std, generator)
        normal_(self.down_proj.weight, out_std, generator)
