"""Aux losses against hand-written formulas; exact int64 counts; bias update; counting under AC and accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from models_testutil import moe_cfg

from framework.config.sections import MoEConfig
from framework.models.moe.balancing import (
    expert_counts,
    load_balance_loss,
    router_z_loss,
    sequence_load_balance_loss,
    update_bias_,
)
from framework.models.moe.layer import MoELayer, build_topk_router


def test_load_balance_loss_matches_hand_formula() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])  # counts: e0=3, e1=2, e2=3
    T, K, E = 4, 2, 3
    P = [sum(probs[t, i].item() for t in range(T)) / T for i in range(E)]
    c = [3, 2, 3]
    expected = E / (K * T) * sum(ci * pi for ci, pi in zip(c, P))
    assert load_balance_loss(probs, ids, E).item() == pytest.approx(expected, rel=1e-6)
    # Uniform routing gives exactly 1.
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balance_loss(uniform, torch.tensor([[0], [1], [2]] * 2), 3).item() == pytest.approx(1.0)


def test_sequence_loss_is_mean_of_per_sequence_losses() -> None:
    probs = torch.rand(3, 5, 4).softmax(-1)
    ids = torch.randint(0, 4, (3, 5, 2))
    per_seq = [load_balance_loss(probs[b], ids[b], 4) for b in range(3)]
    torch.testing.assert_close(sequence_load_balance_loss(probs, ids, 4), torch.stack(per_seq).mean())
    # ...and differs from the batch-level loss in general.
    assert not torch.allclose(
        sequence_load_balance_loss(probs, ids, 4), load_balance_loss(probs.view(15, 4), ids.view(15, 2), 4)
    )


def test_z_loss_formula() -> None:
    logits = torch.randn(7, 5)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_counts_are_exact_int64_histogram_beyond_bf16_precision() -> None:
    ids = torch.zeros(300, 1, dtype=torch.int64)  # 300 and 257 are not representable in bf16
    ids[:257] = 1
    counts = expert_counts(ids, 3)
    assert counts.dtype == torch.int64 and counts.tolist() == [43, 257, 0]
    assert torch.tensor(257.0, dtype=torch.bfloat16).item() != 257  # why bf16 counts are wrong


def test_bias_update_sign_and_dtype_checks() -> None:
    bias = torch.zeros(4)
    update_bias_(bias, torch.tensor([10, 2, 6, 6]), 0.001)  # mean 6
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    with pytest.raises(TypeError, match="int64"):
        update_bias_(bias, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16), 0.001)


def _layer(**kw: object) -> MoELayer:
    layer = MoELayer(16, moe_cfg(**kw))
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    return layer


def test_layer_counts_equal_topk_histogram_and_sum_over_micro_batches() -> None:
    layer = _layer()
    xs = [torch.randn(2, 5, 16) for _ in range(2)]
    expected = torch.zeros(4, dtype=torch.int64)
    for x in xs:
        expected += expert_counts(layer.router(x.view(-1, 16)).topk_ids_TK, 4)
        layer(x).sum().backward()
    counts = layer.consume_expert_counts()
    assert counts.dtype == torch.int64 and torch.equal(counts, expected) and counts.sum() == 2 * 10 * 2
    assert layer.consume_expert_counts().sum() == 0  # consumed
    layer.eval()
    layer(xs[0])
    assert layer.consume_expert_counts().sum() == 0  # eval forwards do not count


def test_counts_not_doubled_under_activation_checkpointing_and_aux_grad_kept() -> None:
    layer = _layer(z_loss_coef=1e-2)
    x = torch.randn(2, 6, 16, requires_grad=True)

    def run(checkpoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        layer.zero_grad()
        if checkpoint:
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y = layer(x)
        aux = layer.pop_aux_losses()
        (y.square().sum() + sum(aux.values())).backward()
        return layer.consume_expert_counts(), layer.router.gate.weight.grad.clone()

    plain_counts, plain_grad = run(False)
    ckpt_counts, ckpt_grad = run(True)
    assert torch.equal(plain_counts, ckpt_counts) and plain_counts.sum() == 12 * 2
    torch.testing.assert_close(plain_grad, ckpt_grad)
    assert layer.pop_aux_losses() == {}  # the recompute did not store a second set


def test_aux_losses_weighted_and_only_positive_coefs() -> None:
    layer = _layer(aux_loss_coef=0.5, seq_aux_loss_coef=0.0, z_loss_coef=0.25)
    x = torch.randn(2, 5, 16)
    layer(x)
    aux = layer.pop_aux_losses()
    assert set(aux) == {"load_balance", "router_z"}
    routed = layer.router(x.view(-1, 16))
    torch.testing.assert_close(
        aux["load_balance"], 0.5 * load_balance_loss(routed.scores_TE, routed.topk_ids_TK, 4)
    )
    torch.testing.assert_close(aux["router_z"], 0.25 * router_z_loss(routed.logits_TE))
    assert layer.pop_aux_losses() == {}


def test_update_expert_bias_moves_load_toward_balance() -> None:
    layer = _layer(bias_update_rate=0.01, score_func="sigmoid", aux_loss_coef=0.0)
    with torch.no_grad():
        layer.router.gate.weight[0] += 1.0  # expert 0 overloaded
    x = torch.randn(64, 1, 16)
    first = None
    for _ in range(60):
        layer(x)
        counts = layer.consume_expert_counts()
        first = counts if first is None else first
        layer.update_expert_bias(counts)
    assert "router.expert_bias" in layer.state_dict()  # saved in checkpoints
    assert layer.router.expert_bias[0] < 0
    assert counts.max() < first.max()
    stats = layer.routing_stats()
    assert set(stats) >= {"tokens_per_expert", "load_max_over_mean", "dropped_fraction", "router_entropy"}


def test_routing_stats_report_dropped_fraction() -> None:
    layer = _layer(capacity_factor=0.5)
    layer(torch.randn(2, 8, 16))
    stats = layer.routing_stats()
    # C = ceil(16*2/4*0.5) = 4 per expert -> at most 16 of 32 pairs kept.
    assert stats["dropped_fraction"] >= 0.5 and sum(stats["tokens_per_expert"]) == 32
    assert layer.routing_stats() == {}


class _TwoSiteLayer(MoELayer):
    """A block that routes its tokens twice through the same experts, each time with its own router."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        self.second_router = build_topk_router(dim, cfg)

    def site_routers(self) -> list[torch.nn.Module]:
        return [self.router, self.second_router]

    def routing_site_names(self) -> list[str]:
        return ["first", "second"]

    def forward_tokens(self, x_BSD: torch.Tensor, tp_group: object) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        y_TD = self.route_and_compute(x_TD, self.router, 0, B, S, None)
        y_TD = y_TD + self.route_and_compute(x_TD + y_TD, self.second_router, 1, B, S, None)
        return y_TD.view(B, S, D)


def test_routing_sites_keep_their_own_counts_aux_and_bias() -> None:
    cfg = moe_cfg(bias_update_rate=0.01, score_func="sigmoid", aux_loss_coef=0.5)
    layer = _TwoSiteLayer(16, cfg)
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    assert layer.active_experts_per_token == 2 * cfg.top_k
    x = torch.randn(2, 5, 16)
    y = layer(x)
    aux = layer.pop_aux_losses()
    x_TD = x.view(-1, 16)
    first = layer.router(x_TD)
    y1 = layer.route_and_compute(x_TD, layer.router, 0, 2, 5, None)
    second = layer.second_router(x_TD + y1)
    expected_aux = sum(
        0.5 * load_balance_loss(r.scores_TE / r.scores_TE.sum(-1, keepdim=True), r.topk_ids_TK, 4)
        for r in (first, second)
    )
    torch.testing.assert_close(aux["load_balance"], expected_aux)  # one term per site, summed
    assert y.shape == x.shape
    layer.consume_expert_counts()  # drop the extra counts of the check above
    layer(x)
    counts = layer.consume_expert_counts()
    assert counts.shape == (2, 4) and counts.dtype == torch.int64
    assert torch.equal(counts[0], expert_counts(first.topk_ids_TK, 4))
    assert torch.equal(counts[1], expert_counts(second.topk_ids_TK, 4))
    layer.update_expert_bias(counts)
    for router, c in zip(layer.site_routers(), counts):
        expected = torch.sign(c.double().mean() - c.double()).float() * 0.01
        torch.testing.assert_close(router.expert_bias, expected)
