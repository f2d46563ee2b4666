from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.models.masking import document_causal_mask, document_ids_from_positions


def positions_of(lengths: list[int]) -> list[int]:
    return [p for n in lengths for p in range(n)]


def test_document_ids() -> None:
    position_ids = torch.tensor(
        [
            positions_of([3, 2, 4]),
            [5, 6, 7, 0, 1, 2, 0, 1, 2],  # a first document that starts mid-way is still one document
            [0, 0, 0, 0, 1, 2, 3, 4, 5],  # single-token documents
        ]
    )
    assert document_ids_from_positions(position_ids).tolist() == [
        [0, 0, 0, 1, 1, 2, 2, 2, 2],
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        [0, 1, 2, 3, 3, 3, 3, 3, 3],
    ]
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        document_ids_from_positions(torch.arange(4))


def test_mask_matches_its_definition() -> None:
    position_ids = torch.tensor([positions_of([4, 1, 3]), positions_of([8])])
    mask = document_causal_mask(position_ids)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    docs = document_ids_from_positions(position_ids)
    for b in range(2):
        for q in range(8):
            for k in range(8):
                assert mask[b, 0, q, k] == (docs[b, q] == docs[b, k] and k <= q)
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())  # one document = plain causal


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain multi-head and grouped-query (enable_gqa)
def test_sdpa_with_mask_equals_documents_run_separately(kv_heads: int) -> None:
    # Two rows of packed documents; the last stretch of the first row plays the padding tail (positions restart).
    lengths = [[5, 9, 1, 7, 2], [12, 12]]
    S, H, D = 24, 4, 16
    position_ids = torch.tensor([positions_of(row) for row in lengths])
    q = torch.randn(2, H, S, D)
    k = torch.randn(2, kv_heads, S, D)
    v = torch.randn(2, kv_heads, S, D)
    gqa = kv_heads != H
    packed = F.scaled_dot_product_attention(
        q, k, v, attn_mask=document_causal_mask(position_ids), enable_gqa=gqa
    )
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            end = start + n
            alone = F.scaled_dot_product_attention(
                q[b : b + 1, :, start:end],
                k[b : b + 1, :, start:end],
                v[b : b + 1, :, start:end],
                is_causal=True,
                enable_gqa=gqa,
            )
            # fp32: masked keys contribute exact zeros, so only the reduction order differs (measured max |diff|
            # 3.6e-7 on CPU); 1e-5 leaves headroom for other kernels.
            torch.testing.assert_close(packed[b : b + 1, :, start:end], alone, atol=1e-5, rtol=1e-5)
            start = end
    # Without the mask the later documents would see the earlier ones: the check above is not vacuous.
    unmasked = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert (unmasked[0, :, 5:] - packed[0, :, 5:]).abs().max() > 1e-2
