"""RMSNorm (Zhang & Sennrich 2019), the Llama/Mixtral convention: normalise in fp32, scale in the input dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x²) + eps))`` in plain autograd ops (what :class:`RMSNorm` computes)."""
    x_fp32 = _upcast(x)
    x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_fp32.to(x.dtype)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _RMSNormFunction(torch.autograd.Function):
    """:func:`rms_norm_reference` with a hand-written backward that keeps only ``x`` and the per-row ``1/rms`` for
    it (plain autograd also keeps the normalised ``x``: one more activation-sized tensor per norm)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x_fp32 = _upcast(x)
        rstd = torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x_fp32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = _upcast(x) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            lead = tuple(range(grad_y.ndim - 1))
            grad_w = (_upcast(grad_y) * _upcast(normed.to(x.dtype))).sum(lead).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The forward casts the normalised x to x's dtype before the scale: its gradient is rounded there too.
            grad_n = _upcast((grad_y * weight).to(x.dtype))
            grad_x = (rstd * (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """``y = weight * (x / sqrt(mean(x²) + eps))``; the statistics are computed in fp32.

    Plain tensors go through a function that keeps half the activations for the backward; DTensors (tensor and
    sequence parallelism) through the plain ops, whose placements DTensor propagates."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if isinstance(x_BSD, DTensor) or isinstance(self.weight, DTensor):
            return rms_norm_reference(x_BSD, self.weight, self.eps)
        return _RMSNormFunction.apply(x_BSD, self.weight, self.eps)

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Norm weights start at 1."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
