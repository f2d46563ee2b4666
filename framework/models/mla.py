"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434; V3 2412.19437). Registered as attention ``"mla"``.

Keys and values come from one compressed latent per token: ``kv_a_proj_with_mqa`` maps ``x`` to a ``kv_lora_rank``
latent (normalised, then expanded per head by ``kv_b_proj`` into the non-rotated key part and the value) plus one
``qk_rope_head_dim`` rotated key part shared by every head. Queries come from ``q_proj``, or with ``q_lora_rank``
from the low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj``; each query head is ``[nope | rope]``. Attention scale
``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``. Parameter names follow transformers' ``DeepseekV3Attention``.

RoPE is the ``rotate_half`` convention on the rotated parts. DeepSeek's checkpoints (transformers'
``rope_interleave=True``) rotate interleaved pairs ``(x0, x1), (x2, x3), …`` instead; that equals ``rotate_half`` on
the even-then-odd reordering of those dimensions, so the HF importer permutes the rows of the projections that
produce them (``framework.interop.hf.state_map``) and this module needs no second convention. The latent norms use
eps 1e-6 whatever ``model.norm_eps`` is, as DeepSeek's reference and transformers do.

Under tensor parallelism (:func:`framework.parallel.tensor_parallel.apply_tensor_parallel`) the input is a
replicated DTensor holding the full sequence. The down projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and the
latent norms are replicated and run as DTensor ops on every rank; the up projections (``q_proj`` or ``q_b_proj``,
``kv_b_proj``) are column-parallel over whole heads and return plain local tensors of ``n_heads / tp`` heads, so the
head count is taken from their outputs; ``o_proj`` is row-parallel. The shared rotated key part is the one place this
module turns a replicated DTensor into a local tensor itself: each rank uses it for its own heads only, so its
gradient is marked a pending sum over the ranks (:func:`~framework.models.sharding.local_weight`).
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

LATENT_NORM_EPS = 1e-6
"""Epsilon of ``q_a_layernorm`` and ``kv_a_layernorm`` (fixed in DeepSeek's reference code and in transformers)."""


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA: ``forward(x_BSD, cos_SR, sin_SR, position_ids_BS) -> [B, S, D]`` with RoPE tables of size
    ``qk_rope_head_dim``."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        dim, H = model_cfg.dim, model_cfg.n_heads
        self.n_heads = H
        self.q_lora_rank = model_cfg.q_lora_rank
        self.kv_lora_rank = model_cfg.kv_lora_rank
        self.nope_dim = model_cfg.qk_nope_head_dim
        self.rope_dim = model_cfg.qk_rope_head_dim
        self.v_dim = model_cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(dim, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, dim, bias=False)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        position_ids_BS: torch.Tensor | None = None,
        attn_mask_B1SS: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``x [B, S, D] -> [B, S, D]``; ``cos/sin`` are RoPE tables of size ``qk_rope_head_dim``, ``position_ids``
        optional; ``attn_mask`` / ``cache``: see :func:`~framework.models.kv_cache.causal_attention`."""
        B, S, _ = x_BSD.shape
        if self.q_proj is not None:
            q_BSX = self.q_proj(x_BSD)
        else:
            q_BSX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))  # type: ignore[misc]
        q_BHSQ = q_BSX.view(B, S, -1, self.qk_dim).transpose(1, 2)
        q_nope_BHSN, q_rot_BHSR = q_BHSQ.split([self.nope_dim, self.rope_dim], dim=-1)

        latent_BSC, k_rot_BSR = self.kv_a_proj_with_mqa(x_BSD).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        kv_BHSX = self.kv_b_proj(self.kv_a_layernorm(latent_BSC)).view(B, S, -1, self.nope_dim + self.v_dim)
        k_nope_BHSN, v_BHSV = kv_BHSX.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)

        # Under TP ``k_rot`` is a replicated DTensor; its local copy feeds only this rank's heads, so the gradient
        # that comes back is this rank's share (a Partial sum), not the whole gradient.
        k_rot_BSR = local_weight(k_rot_BSR)
        q_rot_BHSR = apply_rope(q_rot_BHSR, cos_SR, sin_SR, position_ids_BS)
        k_rot_B1SR = apply_rope(k_rot_BSR.unsqueeze(1), cos_SR, sin_SR, position_ids_BS)
        H = q_BHSQ.shape[1]
        q_BHSQ = torch.cat((q_nope_BHSN, q_rot_BHSR), dim=-1)
        k_BHSQ = torch.cat((k_nope_BHSN, k_rot_B1SR.expand(-1, H, -1, -1)), dim=-1)
        o_BHSV = causal_attention(q_BHSQ, k_BHSQ, v_BHSV, attn_mask_B1SS, cache)
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, -1))

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Projections ``N(0, init_std)``, the output projection ``N(0, out_std)``, latent norms 1."""
        for proj in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj_with_mqa, self.kv_b_proj):
            if proj is not None:
                normal_(proj.weight, init_std, generator)
        normal_(self.o_proj.weight, out_std, generator)
        with torch.no_grad():
            for norm in (self.q_a_layernorm, self.kv_a_layernorm):
                if norm is not None:
                    norm.weight.fill_(1.0)

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope={self.nope_dim}, qk_rope={self.rope_dim}, v={self.v_dim}"
        )
