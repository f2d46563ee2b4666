"""``train.deterministic``'s MoE paths (taken while torch's deterministic algorithms are on): expert counts by a
one-hot sum, dispatch gathers from unique slots and combine sums each token's rows in slot order, with no scatter or
index_add over repeated indices. They must give what the default scatter paths give.

Tolerances: integer counts exactly. Sums of floats: each token's ``k`` rows are added in another order (index_add
row by row vs a reduction over ``k``), so values and gradients agree to fp32 rounding (rtol 1e-6, atol 1e-6 on values
of order 1: a few ulps); with ``k = 2`` the two orders are the same additions and agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from models_testutil import moe_cfg

from framework.models.moe.balancing import expert_counts, sequence_load_balance_loss
from framework.models.moe.dispatch import LocalDispatcher
from framework.models.moe.layer import MoELayer


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def both_paths(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn()`` on the default path, then with torch's deterministic algorithms on."""
    torch.use_deterministic_algorithms(False)
    default = fn()
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic = fn()
    return default, deterministic


def _ids(T: int, K: int, E: int, seed: int) -> torch.Tensor:
    """Distinct experts per token, as top-k gives (some experts may get none)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])


@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize("T, K, E", [(1, 1, 1), (37, 2, 8), (64, 4, 16), (5, 1, 32)])
def test_expert_counts_are_the_same_integers_on_both_paths(T: int, K: int, E: int) -> None:
    ids = _ids(T, K, E, seed=T)
    default, deterministic = both_paths(lambda: expert_counts(ids, E))
    assert deterministic.dtype == torch.int64
    assert torch.equal(deterministic, default)
    assert torch.equal(deterministic, torch.bincount(ids.reshape(-1), minlength=E))


@pytest.mark.usefixtures("restore_determinism")
def test_sequence_balance_loss_and_its_gradient_are_identical_on_both_paths() -> None:
    B, S, K, E = 3, 11, 2, 8
    ids = _ids(B * S, K, E, seed=1).view(B, S, K)
    logits = torch.randn(B, S, E, generator=torch.Generator().manual_seed(2))

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits.clone().requires_grad_()
        loss = sequence_load_balance_loss(probs.softmax(-1), ids, E)
        loss.backward()
        return loss.detach(), probs.grad

    (loss0, grad0), (loss1, grad1) = both_paths(loss_and_grad)
    # The counts are exact small integers in fp32 on both paths; everything after them is the same ops.
    assert torch.equal(loss1, loss0) and torch.equal(grad1, grad0)


def _dispatch_combine(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, E: int, capacity_factor: float
) -> tuple[torch.Tensor, ...]:
    """Output, x and gate-weight gradients of dispatch -> per-expert scaling -> combine."""
    x = x.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    d = LocalDispatcher(E, capacity_factor=capacity_factor)
    x_ND, tokens_per_expert_E, ctx = d.dispatch(x, ids, w)
    expert_of_row = torch.repeat_interleave(torch.arange(E), tokens_per_expert_E)
    y_ND = x_ND * (1.0 + expert_of_row.unsqueeze(-1))  # expert e multiplies by e + 1
    y = d.combine(y_ND, ctx)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, w.grad, tokens_per_expert_E


@pytest.mark.usefixtures("restore_determinism")
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_dispatch_and_combine_give_the_default_values_and_gradients(K: int, capacity_factor: float) -> None:
    T, E, D = 40, 8, 6
    g = torch.Generator().manual_seed(K)
    x, weights = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    ids = _ids(T, K, E, seed=K + 10)
    default, deterministic = both_paths(lambda: _dispatch_combine(x, ids, weights, E, capacity_factor))
    assert torch.equal(deterministic[3], default[3]), "the same rows are kept per expert"
    exact = K <= 2
    for name, got, ref in zip(("output", "x grad", "weight grad"), deterministic[:3], default[:3]):
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(got, ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.usefixtures("restore_determinism")
def test_dropped_tokens_still_combine_to_zero_on_the_deterministic_path() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    ids = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.2], [0.9], [0.5], [0.7]])
    d = LocalDispatcher(2, capacity_factor=1.0, drop_policy="probs")
    x = torch.arange(1.0, 5.0).unsqueeze(-1).expand(4, 3).contiguous()
    x_ND, _, ctx = d.dispatch(x, ids, w)
    y = d.combine(x_ND, ctx)
    assert torch.equal(y[0], torch.zeros(3))  # token 0 had the lowest weight on the full expert
    torch.testing.assert_close(y[1:], x[1:] * w[1:])


@pytest.mark.usefixtures("restore_determinism")
def test_moe_layer_forward_aux_losses_and_gradients_match_on_both_paths() -> None:
    cfg = moe_cfg(num_experts=8, top_k=2, aux_loss_coef=0.01, seq_aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(16, cfg)
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    x_BSD = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        layer.zero_grad()
        y = layer(x_BSD)
        aux = layer.pop_aux_losses()
        (y.square().sum() + sum(aux.values())).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        return y.detach(), {k: v.detach() for k, v in aux.items()}, grads

    (y0, aux0, grads0), (y1, aux1, grads1) = both_paths(step)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)  # k = 2: the same additions
    assert aux1.keys() == aux0.keys() == {"load_balance", "seq_load_balance", "router_z"}
    for k in aux0:
        assert torch.equal(aux1[k], aux0[k]), k
    assert grads1.keys() == grads0.keys() and grads0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(
        layer.consume_expert_counts(), 2 * expert_counts(layer.router(x_BSD.view(-1, 16)).topk_ids_TK, 8)
    )


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_dispatch_traces_without_a_graph_break() -> None:
    import torch._dynamo

    torch.use_deterministic_algorithms(True, warn_only=True)
    E, T, K = 4, 10, 2
    ids, weights, x = _ids(T, K, E, seed=0), torch.rand(T, K), torch.randn(T, 3)
    d = LocalDispatcher(E)

    def round_trip(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x_ND, _, ctx = d.dispatch(x, ids, weights)
        return d.combine(x_ND, ctx)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(round_trip)(x, ids, weights)
    assert explanation.graph_break_count == 0, explanation.break_reasons
