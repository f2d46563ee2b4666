"""Router math: score functions, renormalisation, scaling, group-limited routing, bias used only for selection."""

from __future__ import annotations

import pytest
import torch

from framework.models.moe.router import TopKRouter


def _router(**kw: object) -> TopKRouter:
    args = dict(dim=8, num_experts=8, top_k=2)
    args.update(kw)
    r = TopKRouter(**args)  # type: ignore[arg-type]
    torch.nn.init.normal_(r.gate.weight, std=0.5)
    return r


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("route_norm", [True, False])
def test_scores_weights_and_scale(score_func: str, route_norm: bool) -> None:
    r = _router(score_func=score_func, route_norm=route_norm, route_scale=2.5)
    x = torch.randn(16, 8)
    out = r(x)
    logits = x.double() @ r.gate.weight.double().T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    top = scores.topk(2, dim=-1)
    expected = top.values
    if score_func == "sigmoid" or route_norm:  # sigmoid is always renormalised
        expected = expected / expected.sum(-1, keepdim=True)
    expected = expected * 2.5
    assert out.logits_TE.dtype == torch.float32 and out.topk_weights_TK.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE.double(), logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores_TE.double(), scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.topk_ids_TK, top.indices)
    torch.testing.assert_close(out.topk_weights_TK.double(), expected, rtol=1e-5, atol=1e-6)


def test_router_is_fp32_under_bf16_autocast_and_bf16_cast() -> None:
    """A bf16 model under bf16 autocast still routes in fp32. Reference: the logits of the same (bf16) input and gate
    weight in fp64. fp32 products of bf16 values are exact and 8 of them sum with ~1e-7 relative round-off (rtol 1e-6
    allowed); a bf16 matmul rounds every logit to 8 bits (up to 2^-9 relative), measured here above 1e-3."""
    r = _router(use_expert_bias=True).to(torch.bfloat16)
    assert r.expert_bias.dtype == torch.float32  # the bias never becomes bf16
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
        bf16_logits = torch.nn.functional.linear(x, r.gate.weight)
    assert out.logits_TE.dtype == torch.float32 and out.scores_TE.dtype == torch.float32
    logits = x.double() @ r.gate.weight.double().T
    torch.testing.assert_close(out.logits_TE.double(), logits, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.scores_TE.double(), logits.softmax(-1), rtol=1e-6, atol=1e-7)
    assert ((bf16_logits.double() - logits).abs() / logits.abs()).max() > 1e-3  # what bf16 routing would give


def test_bias_changes_selection_not_weights() -> None:
    r = _router(score_func="sigmoid", use_expert_bias=True)
    x = torch.randn(32, 8)
    before = r(x)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 0, 5.0, 5.0]))  # force experts 6 and 7
    after = r(x)
    assert torch.equal(after.topk_ids_TK.sort(-1).values, torch.tensor([[6, 7]]).expand(32, 2))
    # Gate weights come from the unbiased scores of the chosen experts.
    chosen = before.scores_TE[:, 6:8]
    torch.testing.assert_close(
        after.topk_weights_TK.sort(-1).values, (chosen / chosen.sum(-1, keepdim=True)).sort(-1).values
    )
    assert not torch.equal(before.topk_ids_TK, after.topk_ids_TK)


def test_group_limited_routing_masks_with_minus_inf() -> None:
    # 8 experts in 4 groups of 2, keep 2 groups. Sigmoid scores plus a strongly negative bias on the kept groups:
    # masking with 0 would prefer the masked experts (0 > negative); -inf must not.
    r = _router(score_func="sigmoid", n_groups=4, topk_groups=2, use_expert_bias=True)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0:4, 0] = 4.0  # groups 0 and 1 score highest for x = e_0
        r.expert_bias.copy_(torch.tensor([-2.0, -2.0, -2.0, -2.0, -10.0, -10.0, -10.0, -10.0]))
    x = torch.zeros(3, 8)
    x[:, 0] = 1.0
    out = r(x)
    # biased selection scores: kept groups ≈ sigmoid(4) - 2 ≈ -1.02 (group score ≈ -2.04),
    # other groups ≈ 0.5 - 10 (group score ≈ -19): groups 0 and 1 are kept.
    assert set(out.topk_ids_TK.flatten().tolist()) <= {0, 1, 2, 3}
    # The buggy variant (mask with 0) would pick masked experts, because 0 > -1.02:
    choice = out.scores_TE + r.expert_bias
    buggy = choice.clone()
    buggy[:, 4:] = 0.0
    assert set(buggy.topk(2, dim=-1).indices.flatten().tolist()) <= {4, 5, 6, 7}


def test_group_score_is_sum_of_top2() -> None:
    # Group A = {9, 0} (max 9, top-2 sum 9), group B = {5, 5} (top-2 sum 10): top-2 sum keeps B, max would keep A.
    r = _router(num_experts=4, top_k=1, score_func="sigmoid", n_groups=2, topk_groups=1)
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5]])
    kept = r._mask_groups(scores)
    assert torch.isinf(kept[0, :2]).all() and torch.equal(kept[0, 2:], scores[0, 2:])


def test_router_gradients_flow_to_gate_through_weights() -> None:
    r = _router()
    out = r(torch.randn(5, 8))
    out.topk_weights_TK[:, 0].sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
