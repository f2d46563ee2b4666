"""Attention masks for packed sequences: documents are found from ``position_ids`` alone.

A packed sequence holds several documents back to back, each with positions ``0, 1, 2, ...`` (see
``framework/data/sft.py``; its padding tail is a document of its own). A document starts wherever the position does not
continue the previous one (``pos[t] != pos[t-1] + 1``), the rule transformers uses to detect packed batches
(``masking_utils.find_packed_sequence_indices``); so a first document that starts mid-way (positions ``5, 6, ...``)
is still one document.

:func:`document_causal_mask` returns the boolean mask ``scaled_dot_product_attention`` takes (``True`` = may attend):
query ``q`` attends key ``k`` when both are in the same document and ``k <= q``. Every query attends at least
itself, so no softmax row is empty. Cost: ``B * S * S`` booleans (64 MiB for ``B=4, S=4096``); a
``flex_attention`` block mask or varlen kernel is the choice for long sequences.
"""

from __future__ import annotations

import torch


def document_ids_from_positions(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """Document index ``[B, S]`` (``0, 0, 0, 1, 1, 2, ...`` per row) of every token of ``position_ids [B, S]``.

    A new document starts at every token whose position is not the previous token's position + 1; the first token
    of each row opens document 0.
    """
    if position_ids_BS.ndim != 2:
        raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids_BS.shape)}")
    # The prepended "previous position" makes the first token continue it, so each row starts in document 0.
    diff_BS = torch.diff(position_ids_BS, dim=-1, prepend=position_ids_BS[:, :1] - 1)
    return (diff_BS != 1).long().cumsum(dim=-1)


def document_causal_mask(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]``: ``mask[b, 0, q, k]`` is True when key ``k`` is in query ``q``'s
    document and ``k <= q``. Pass it as ``attn_mask`` to ``scaled_dot_product_attention`` (with ``is_causal=False``);
    the head dimension broadcasts."""
    doc_BS = document_ids_from_positions(position_ids_BS)
    S = doc_BS.shape[-1]
    same_doc_BSS = doc_BS.unsqueeze(-1) == doc_BS.unsqueeze(-2)
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    return (same_doc_BSS & causal_SS).unsqueeze(1)
