"""RMSNorm (Zhang & Sennrich 2019), the Llama/Mixtral convention: normalise in fp32, scale in the input dtype."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = weight * (x / sqrt(mean(x²) + eps))``; the statistics are computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_fp32 = x_BSD.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x_BSD.dtype)

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Norm weights start at 1."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
