"""Grouped-query attention (Ainslie et al. 2023) through ``torch.nn.functional.scaled_dot_product_attention``.

Registered as attention component ``"gqa"``. Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``,
the transformers ``repeat_kv`` convention. Under tensor parallelism each rank holds a contiguous block of
``n_heads / tp`` query and ``n_kv_heads / tp`` key/value heads; query head ``h`` still finds its key/value head in
the same block, so the forward takes its head counts from the (local) projection outputs and is otherwise unchanged.
Parameter names follow transformers' Llama (``q_proj`` … ``o_proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.sections import ModelConfig
from framework.models.init import normal_
from framework.models.rope import apply_rope


class GroupedQueryAttention(nn.Module):
    """Causal multi-head attention with ``n_kv_heads`` shared key/value heads and RoPE on queries and keys."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads
        self.head_dim = model_cfg.resolved_head_dim
        dim = model_cfg.dim
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        position_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, S, D] -> [B, S, D]``; ``cos/sin`` are the model's RoPE tables, ``position_ids`` optional."""
        B, S, _ = x_BSD.shape
        # ``-1`` heads: under tensor parallelism the projections hold only this rank's heads (n_heads / tp query
        # and n_kv_heads / tp key/value heads), so the head counts come from the projection outputs.
        q_BHSR = self.q_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BKSR = self.k_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BKSR = self.v_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        q_BHSR = apply_rope(q_BHSR, cos_SR, sin_SR, position_ids_BS)
        k_BKSR = apply_rope(k_BKSR, cos_SR, sin_SR, position_ids_BS)
        o_BHSR = F.scaled_dot_product_attention(
            q_BHSR, k_BKSR, v_BKSR, is_causal=True, enable_gqa=q_BHSR.shape[1] != k_BKSR.shape[1]
        )
        return self.o_proj(o_BHSR.transpose(1, 2).reshape(B, S, -1))

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """q/k/v ``N(0, init_std)``; the output projection ``N(0, out_std)``."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            normal_(proj.weight, init_std, generator)
        normal_(self.o_proj.weight, out_std, generator)
