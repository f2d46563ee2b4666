"""The dense SwiGLU feed-forward network (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from framework.models.init import normal_


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up`` for the backward (plain autograd also keeps
    ``silu(gate)``: one more ``[tokens, hidden]`` tensor per MLP). The backward runs in fp32 at least."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dtype = torch.promote_types(gate.dtype, torch.float32)
        g, u, dy = gate.to(dtype), up.to(dtype), grad.to(dtype)
        sig = torch.sigmoid(g)
        grad_up = dy * g * sig
        grad_gate = dy * u * sig * (1 + g * (1 - sig))
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; lean on activation memory for plain tensors, plain ops for DTensors."""
    if isinstance(gate, DTensor) or isinstance(up, DTensor):
        return F.silu(gate) * up
    return _SwiGLUFunction.apply(gate, up)


class FeedForward(nn.Module):
    """SwiGLU MLP with the transformers Llama parameter names (``gate_proj``, ``up_proj``, ``down_proj``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x_BSD), self.up_proj(x_BSD)))

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Input projections ``N(0, init_std)``; the output projection ``N(0, out_std)``."""
        normal_(self.gate_proj.weight, init_std, generator)
        normal_(self.up_proj.weight, init_std, generator)
        normal_(self.down_proj.weight, out_std, generator)
