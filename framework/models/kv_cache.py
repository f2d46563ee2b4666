"""Key/value cache for incremental decoding, and the causal attention every attention component calls.

:class:`KVCache` holds one :class:`LayerKVCache` per block. A forward with a cache takes the new tokens only: their
keys and values are written after the cached ones (preallocated buffers of ``capacity`` tokens, so a step costs no
copy of the past), and the queries attend to every cached key up to their own position. Positions continue from
the cache's length, so RoPE sees the same positions as a forward over the whole sequence.

:func:`causal_attention` is the one place the attention mask is chosen: the cache's offset-causal mask, a packed
batch's document mask (``framework/models/masking.py``), or plain ``is_causal``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerKVCache:
    """Keys ``[B, K, capacity, R]`` and values ``[B, K, capacity, V]`` of one attention layer, filled left to right."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def append(self, k_BKSR: torch.Tensor, v_BKSV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values; return all of them so far (views, no copy)."""
        B, K, S, _ = k_BKSR.shape
        if self._k is None or self._v is None:
            self._k = k_BKSR.new_empty(B, K, self.capacity, k_BKSR.shape[-1])
            self._v = v_BKSV.new_empty(B, v_BKSV.shape[1], self.capacity, v_BKSV.shape[-1])
        end = self.length + S
        if end > self.capacity:
            raise ValueError(
                f"the KV cache holds {self.capacity} tokens (model.max_seq_len); {end} requested: shorten the "
                "prompt or max_new_tokens"
            )
        self._k[:, :, self.length : end] = k_BKSR
        self._v[:, :, self.length : end] = v_BKSV
        self.length = end
        return self._k[:, :, :end], self._v[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per block; ``length`` tokens cached so far (the next token's position)."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.layers[0].length


def causal_attention(
    q_BHSR: torch.Tensor,
    k_BKSR: torch.Tensor,
    v_BKSV: torch.Tensor,
    attn_mask_B1SS: torch.Tensor | None = None,
    cache: LayerKVCache | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ / √R) v`` through SDPA, causal; ``K`` key/value heads may be fewer than ``H`` query heads.

    ``cache``: append ``k``/``v`` first and attend to every cached key at or before each query's position.
    ``attn_mask_B1SS``: a boolean mask (True = may attend) replacing the causal one, e.g. a packed batch's
    :func:`~framework.models.masking.document_causal_mask`.
    """
    gqa = q_BHSR.shape[1] != k_BKSR.shape[1]
    if cache is not None:
        past = cache.length
        k_BKSR, v_BKSV = cache.append(k_BKSR, v_BKSV)
        S, T = q_BHSR.shape[2], k_BKSR.shape[2]
        if S == 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q_BHSR, k_BKSR, v_BKSV, enable_gqa=gqa)
        keys_T = torch.arange(T, device=q_BHSR.device)
        queries_S = torch.arange(past, past + S, device=q_BHSR.device)
        mask_SS = keys_T.unsqueeze(0) <= queries_S.unsqueeze(1)
        return F.scaled_dot_product_attention(q_BHSR, k_BKSR, v_BKSV, attn_mask=mask_SS, enable_gqa=gqa)
    if attn_mask_B1SS is not None:
        return F.scaled_dot_product_attention(
            q_BHSR, k_BKSR, v_BKSV, attn_mask=attn_mask_B1SS, enable_gqa=gqa
        )
    return F.scaled_dot_product_attention(q_BHSR, k_BKSR, v_BKSV, is_causal=True, enable_gqa=gqa)
