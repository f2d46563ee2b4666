"""Local dispatch: stable permutation round trip, capacity dropping by probability and by position, dropless."""

from __future__ import annotations

import pytest
import torch

from framework.models.moe.dispatch import LocalDispatcher, expert_capacity


def test_round_trip_groups_by_expert_stably_and_combines_weighted() -> None:
    T, K, E, D = 6, 2, 3, 4
    x = torch.randn(T, D)
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2], [1, 0], [2, 0]])
    w = torch.rand(T, K)
    d = LocalDispatcher(E)
    x_ND, tpe, ctx = d.dispatch(x, ids, w)
    assert tpe.dtype == torch.int64 and tpe.tolist() == [5, 3, 4]
    # Stable: within an expert, tokens stay in their original order.
    assert ctx.token_idx_N.tolist() == [0, 1, 3, 4, 5, 1, 2, 4, 0, 2, 3, 5]
    assert torch.equal(x_ND, x[ctx.token_idx_N])
    # Identity experts: combine returns sum_k w_tk * x_t.
    y = d.combine(x_ND, ctx)
    torch.testing.assert_close(y, x * w.sum(-1, keepdim=True))
    assert int(ctx.dropped_N) == 0


def _bf16_ulps(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|value - reference| in units of the bf16 spacing at the reference (8 significant bits)."""
    spacing = torch.exp2(torch.floor(torch.log2(reference.abs())) - 7)
    return (value.double() - reference).abs() / spacing


@pytest.mark.parametrize("deterministic", [False, True], ids=["index_add", "fixed_order"])
def test_combine_accumulates_in_fp32_and_returns_input_dtype(deterministic: bool) -> None:
    """Each token's 64 weighted expert rows (bf16 expert outputs, fp32 gate weights) are summed; experts alternate in
    sign, so the terms (~0.75·|x| each) cancel to a sum ~20x smaller and any rounding of a term to bf16 shows.
    Reference: the same sum in fp64. fp32 products and accumulation, then one rounding to bf16, stay within half a
    bf16 spacing of it (fp32 round-off of 64 terms is ~4e-4 of a spacing here; 0.01 allowed). Products rounded to bf16
    and summed by ``index_add_`` measured 6.8 spacings off, a bf16 running sum 17.9: the check tells them apart."""
    T, E, D = 8, 64, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    w = torch.rand(T, E, generator=g)
    sign_E = torch.tensor([1.0, -1.0]).repeat(E // 2)
    ids = torch.arange(E).expand(T, E).contiguous()  # every token to every expert: 64 terms per sum
    d = LocalDispatcher(E)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        x_ND, counts_E, ctx = d.dispatch(x, ids, w)
        y_ND = (x_ND.float() * sign_E.repeat_interleave(counts_E).unsqueeze(-1)).to(
            torch.bfloat16
        )  # rows by expert
        out = d.combine(y_ND, ctx)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert out.dtype == torch.bfloat16
    reference = x.double() * (w.double() * sign_E.double()).sum(-1, keepdim=True)
    assert _bf16_ulps(out, reference).max() <= 0.5 + 0.01
    rounded_terms = (x.float().unsqueeze(1) * (w * sign_E).unsqueeze(-1)).to(torch.bfloat16)  # (T, E, D)
    bf16_sum = torch.zeros(T, D, dtype=torch.bfloat16).index_add_(
        0, torch.arange(T).repeat_interleave(E), rounded_terms.reshape(T * E, D)
    )
    assert _bf16_ulps(bf16_sum, reference).max() > 2  # what bf16 products would give


def test_capacity_drop_by_probs_keeps_highest_weights() -> None:
    # 4 tokens, k=1, 2 experts, factor 1 -> C = 2. Expert 0 gets tokens 0,1,2 with weights .2,.9,.5.
    ids = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    assert expert_capacity(4, 1, 2, 1.0) == 2
    x = torch.arange(4.0).unsqueeze(-1).expand(4, 3).contiguous()
    d = LocalDispatcher(2, capacity_factor=1.0, drop_policy="probs")
    x_ND, tpe, ctx = d.dispatch(x, ids, w)
    assert tpe.tolist() == [2, 1]
    assert sorted(ctx.token_idx_N[:2].tolist()) == [1, 2] and ctx.token_idx_N[2] == 3
    assert int(ctx.dropped_N) == 1
    y = d.combine(x_ND, ctx)
    assert torch.equal(y[0], torch.zeros(3))  # dropped token contributes 0


def test_capacity_drop_by_position_keeps_earliest() -> None:
    ids = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    d = LocalDispatcher(2, capacity_factor=1.0, drop_policy="position")
    _, tpe, ctx = d.dispatch(torch.randn(4, 3), ids, w)
    assert tpe.tolist() == [2, 1] and ctx.token_idx_N.tolist() == [0, 1, 3]


def test_capacity_rounds_up_and_dropless_drops_nothing() -> None:
    T, K, E = 50, 2, 4
    ids = torch.zeros(T, K, dtype=torch.int64)
    ids[:, 1] = 1  # everything on experts 0 and 1
    w = torch.rand(T, K)
    _, tpe, ctx = LocalDispatcher(E, capacity_factor=0.0).dispatch(torch.randn(T, 3), ids, w)
    assert tpe.tolist() == [50, 50, 0, 0] and int(ctx.dropped_N) == 0
    cap = expert_capacity(T, K, E, 1.5)  # ceil(25 * 1.5) = 38
    assert cap == 38
    _, tpe, ctx = LocalDispatcher(E, capacity_factor=1.5).dispatch(torch.randn(T, 3), ids, w)
    assert tpe.tolist() == [38, 38, 0, 0] and int(ctx.dropped_N) == 24


def test_gradients_flow_to_input_and_weights() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.rand(5, 2, requires_grad=True)
    d = LocalDispatcher(3)
    x_ND, _, ctx = d.dispatch(x, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2]]), w)
    d.combine(x_ND * 2, ctx).sum().backward()
    torch.testing.assert_close(x.grad, 2 * w.detach().sum(-1, keepdim=True).expand(5, 3))
    torch.testing.assert_close(w.grad, 2 * x.detach().sum(-1, keepdim=True).expand(5, 2))


def test_local_dropless_dispatch_traces_without_a_graph_break() -> None:
    """torch.compile takes the whole local dropless dispatch as one graph: the expert counts have a fixed shape (a
    scatter-add into E bins; ``bincount``'s data-dependent size broke the graph there)."""
    import torch._dynamo

    E, T, K = 4, 10, 2
    ids = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(T, K)
    x = torch.randn(T, 3)
    d = LocalDispatcher(E)

    def dispatch(
        x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_MD, counts_E, _ = d.dispatch(x, ids, weights)
        return x_MD, counts_E

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(dispatch)(x, ids, weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    x_MD, counts_E = dispatch(x, ids, weights)
    assert torch.equal(counts_E, torch.bincount(ids.reshape(-1), minlength=E))
    assert x_MD.shape == (T * K, 3)
