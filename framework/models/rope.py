"""Rotary position embeddings (Su et al. 2021) in the ``rotate_half`` convention of transformers' Llama.

The rotated pairs are ``(x[i], x[i + R/2])`` (not interleaved neighbours), so importing a Hugging Face checkpoint is a
plain copy of the q/k projections. Tables are fp32 ``[max_seq_len, head_dim]`` with the frequencies repeated twice.
"""

from __future__ import annotations

import torch


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cos_SR, sin_SR)``, fp32, shape ``[max_seq_len, head_dim]``."""
    inv_freq_R2 = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    pos_S = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs_SR2 = torch.outer(pos_S, inv_freq_R2)
    emb_SR = torch.cat((freqs_SR2, freqs_SR2), dim=-1)
    return emb_SR.cos(), emb_SR.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x_BHSR: torch.Tensor,
    cos_SR: torch.Tensor,
    sin_SR: torch.Tensor,
    position_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate queries or keys ``[B, heads, S, R]``.

    Without ``position_ids`` token ``s`` gets position ``s``; with ``position_ids [B, S]`` each token gets its own
    position (packed documents restart at 0). The rotation is computed in fp32 and cast back to the input dtype.
    """
    seq_len = x_BHSR.shape[-2]
    if position_ids_BS is None:
        cos, sin = cos_SR[:seq_len], sin_SR[:seq_len]  # [S, R], broadcast over B and heads
    else:
        cos, sin = cos_SR[position_ids_BS].unsqueeze(1), sin_SR[position_ids_BS].unsqueeze(1)  # [B, 1, S, R]
    x = x_BHSR.float()
    return (x * cos + rotate_half(x) * sin).to(x_BHSR.dtype)
