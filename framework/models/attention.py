"""Grouped-query attention (Ainslie et al. 2023) through ``torch.nn.functional.scaled_dot_product_attention``.

Registered as attention component ``"gqa"``. Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``,
the transformers ``repeat_kv`` convention. Under tensor parallelism each rank holds a contiguous block of
``n_heads / tp`` query and ``n_kv_heads / tp`` key/value heads; query head ``h`` still finds its key/value head in
the same block, so the forward takes its head counts from the (local) projection outputs and is otherwise unchanged.
Parameter names follow transformers' Llama (``q_proj`` … ``o_proj``).

Options from :class:`~framework.config.sections.ModelConfig` (so imported families are configurations, not special
cases): ``qkv_bias`` / ``o_bias`` (biases on the input / output projections), ``qk_norm`` (Qwen3's RMSNorm over
``head_dim`` on every query and key head before RoPE, one weight shared by all heads) and ``head_dim`` independent of
``dim / n_heads``. Under tensor parallelism a q/k/v bias is sharded with its weight's heads and the q/k norm weights
are replicated; they are read through :func:`~framework.models.sharding.local_weight`, so their gradient is summed
over the tensor-parallel ranks (each rank sees only its heads).
"""

from __future__ import annotations

import torch
from torch import nn

from framework.config.sections import ModelConfig
from framework.models.init import normal_
from framework.models.kv_cache import LayerKVCache, causal_attention
from framework.models.norms import RMSNorm
from framework.models.rope import apply_rope
from framework.models.sharding import local_weight


def head_rms_norm(norm: RMSNorm, x_BHSR: torch.Tensor) -> torch.Tensor:
    """``norm`` over the last dimension with its weight read as a local tensor (replicated under TP)."""
    x_fp32 = x_BHSR.float()
    x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return local_weight(norm.weight) * x_fp32.to(x_BHSR.dtype)


class GroupedQueryAttention(nn.Module):
    """Causal multi-head attention with ``n_kv_heads`` shared key/value heads and RoPE on queries and keys."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads
        self.head_dim = model_cfg.resolved_head_dim
        dim = model_cfg.dim
        qkv_bias = model_cfg.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=model_cfg.o_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if model_cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, model_cfg.norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        position_ids_BS: torch.Tensor | None = None,
        attn_mask_B1SS: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``x [B, S, D] -> [B, S, D]``; ``cos/sin`` are the model's RoPE tables, ``position_ids`` optional;
        ``attn_mask`` / ``cache``: see :func:`~framework.models.kv_cache.causal_attention`."""
        B, S, _ = x_BSD.shape
        # ``-1`` heads: under tensor parallelism the projections hold only this rank's heads (n_heads / tp query
        # and n_kv_heads / tp key/value heads), so the head counts come from the projection outputs.
        q_BHSR = self.q_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BKSR = self.k_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BKSR = self.v_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q_BHSR = head_rms_norm(self.q_norm, q_BHSR)
            k_BKSR = head_rms_norm(self.k_norm, k_BKSR)
        q_BHSR = apply_rope(q_BHSR, cos_SR, sin_SR, position_ids_BS)
        k_BKSR = apply_rope(k_BKSR, cos_SR, sin_SR, position_ids_BS)
        o_BHSR = causal_attention(q_BHSR, k_BKSR, v_BKSR, attn_mask_B1SS, cache)
        return self.o_proj(o_BHSR.transpose(1, 2).reshape(B, S, -1))

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """q/k/v ``N(0, init_std)``; the output projection ``N(0, out_std)``; biases 0; q/k norms 1."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            normal_(proj.weight, init_std, generator)
        normal_(self.o_proj.weight, out_std, generator)
        with torch.no_grad():
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
            for norm in (self.q_norm, self.k_norm):
                if norm is not None:
                    norm.weight.fill_(1.0)
