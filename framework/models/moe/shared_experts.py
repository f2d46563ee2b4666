"""Shared experts: always-on experts every token goes through, beside the routed ones (DeepSeekMoE, Qwen2-MoE).

A core MoE submodule (as in Megatron-Core): :class:`~framework.models.moe.layer.MoELayer` builds one from
``moe.shared_experts`` / ``moe.shared_expert_hidden`` / ``moe.shared_expert_gate`` and stores it as
``shared_experts`` (``None`` without shared experts); its weights are ``ffn.shared_experts.{gate,up,down}_proj`` and,
gated, ``ffn.shared_experts.gate``.

``Ks`` shared experts of hidden size ``I`` are one SwiGLU MLP of hidden ``Ks·I`` (the sum of ``Ks`` SwiGLU MLPs
equals one MLP whose hidden units are their concatenation), which is how DeepSeek-V2/V3 store them. Qwen2-MoE
multiplies the output by a per-token sigmoid gate ``σ(x·w_g)``.

Weights are read through :func:`~framework.models.sharding.local_weight`: under tensor parallelism the MoE layer
works on sequence slices and the plan replicates these weights over the tensor-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.init import normal_
from framework.models.mlp import swiglu
from framework.models.sharding import local_weight


class SharedExperts(nn.Module):
    """``y = [σ(x·w_g)] · down(silu(gate(x)) ⊙ up(x))`` on ``[..., D]`` tokens."""

    def __init__(self, dim: int, hidden: int, gated: bool = False) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"shared experts need a hidden size >= 1, got {hidden}")
        self.hidden = hidden
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate: nn.Linear | None = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = swiglu(_project(self.gate_proj, x), _project(self.up_proj, x))
        y = _project(self.down_proj, h)
        if self.gate is not None:
            y = torch.sigmoid(_project(self.gate, x)) * y
        return y

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """gate/up ``N(0, init_std)``, down ``N(0, out_std)`` (like the dense MLP), the sigmoid gate ``N(0, init_std)``."""
        normal_(self.gate_proj.weight, init_std, generator)
        normal_(self.up_proj.weight, init_std, generator)
        normal_(self.down_proj.weight, out_std, generator)
        if self.gate is not None:
            normal_(self.gate.weight, init_std, generator)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, gated={self.gate is not None}"


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Linear`` reads its (possibly replicated) weight as a local tensor; a projection an adapter plugin
    wrapped (MoLA, LoRA) runs its own forward, which adds the adapter's update."""
    if type(layer) is nn.Linear:
        return F.linear(x, local_weight(layer.weight))
    return layer(x)
