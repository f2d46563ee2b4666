"""Expert parallelism on real gloo ranks: the all-to-all dispatcher and an MoE layer with ep=2 / ep=4 against one rank.

Tolerances (fp32): outputs and gradients agree to 1e-5 relative. The per-expert matmuls are identical, but the
combine sums a token's rows in a different order and gradients of shared weights are summed across ranks, so results
match to round-off, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from framework.config.sections import MoEConfig
from framework.models.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from framework.models.moe.experts import GroupedExperts
from framework.models.moe.layer import MoELayer
from framework.parallel.expert_parallel import apply_expert_parallel, expert_slice, shard_experts_
from tests.distributed.shared_spawn import share

DIM = 16


def _moe_cfg(**overrides: object) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_hidden=24, experts_impl="loop")
    base.update(overrides)
    return MoEConfig(**base)  # type: ignore[arg-type]


class _OneLayer(torch.nn.Module):
    """Holds one MoE layer the way the transformer does, so apply_expert_parallel finds it."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.moe = MoELayer(DIM, cfg)
        gen = torch.Generator().manual_seed(1)
        self.moe.init_weights(0.2, 0.2, gen)

    def moe_layers(self) -> list[MoELayer]:
        return [self.moe]


def _tokens(rank: int, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, DIM, generator=torch.Generator().manual_seed(100 + rank))


def _reference(world: int, tokens: int, cfg: MoEConfig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One rank: each "rank's" tokens through the full layer (capacity is per batch, as under ep), summed loss."""
    model = _OneLayer(cfg)
    outs = []
    for r in range(world):
        y = model.moe(_tokens(r, tokens))
        (y * _weights(r, tokens)).sum().backward()
        outs.append(y.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def _weights(rank: int, tokens: int) -> torch.Tensor:
    return torch.randn(1, tokens, DIM, generator=torch.Generator().manual_seed(200 + rank))


def _ep_layer(rank: int, world: int, tokens: int, cfg: MoEConfig) -> dict[str, object]:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = _OneLayer(cfg)
    assert apply_expert_parallel(model, mesh) == 1
    assert isinstance(model.moe.dispatcher, AllToAllDispatcher)
    assert isinstance(model.moe.experts.gate_up_proj, DTensor)
    y = model.moe(_tokens(rank, tokens))
    (y * _weights(rank, tokens)).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad.clone()
        if not name.startswith("moe.experts"):
            dist.all_reduce(g)  # shared weights: the gradient is the sum over ranks
        grads[name] = g
    return {
        "y": y.detach(),
        "grads": grads,
        "rows_sent": model.moe.dispatcher.rows_sent,
        "rows_sent_remote": model.moe.dispatcher.rows_sent_remote,
        "dropped": model.moe.routing_stats()["dropped_fraction"],
    }


LAYER_CASES: dict[str, tuple[int, dict[str, object]]] = {
    "ep2-dropless": (2, {}),
    "ep4-dropless": (4, {}),
    "ep2-capacity-probs": (2, {"capacity_factor": 1.0}),
    "ep2-capacity-position": (2, {"capacity_factor": 1.0, "drop_policy": "position"}),
}
SKEWED_CASES = ("one_expert", "rank1_sends_nothing", "idle_experts")
TOKENS = 24


def _cases(rank: int, world: int) -> dict[str, dict[str, object]]:
    """Every case of this world size in one spawn (process start-up and imports are most of a case's time); the
    skewed-routing cases are two-rank ones."""
    out = {
        name: _ep_layer(rank, world, TOKENS, _moe_cfg(**overrides))
        for name, (case_world, overrides) in LAYER_CASES.items()
        if case_world == world
    }
    if world == 2:
        out.update({case: _skewed(rank, world, case) for case in SKEWED_CASES})
    return out


# One spawn per world size with the other modules' workers of that size.
share(2, "expert_parallel/cases", _cases)
share(4, "expert_parallel/cases", _cases)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_ep_layer_matches_single_rank(case: str, shared_ranks: Callable[[int, str], list[Any]]) -> None:
    world, overrides = LAYER_CASES[case]
    cfg = _moe_cfg(**overrides)
    ref_out, ref_grads = _reference(world, TOKENS, cfg)
    results = [by_case[case] for by_case in shared_ranks(world, "expert_parallel/cases")]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref_out[rank], rtol=1e-5, atol=1e-6)
        keep = expert_slice(cfg.num_experts, rank, world)
        for name, ref in ref_grads.items():
            expected = ref[keep] if name.startswith("moe.experts") else ref
            torch.testing.assert_close(res["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
        if not overrides:
            # Dropless moves exactly the routed (token, expert) rows: T * k, no padding.
            assert res["rows_sent"] == TOKENS * cfg.top_k
            assert res["dropped"] == 0.0
        else:
            assert res["rows_sent"] < TOKENS * cfg.top_k  # capacity 1.0 drops before the exchange
    assert sum(r["rows_sent_remote"] for r in results) > 0


def _skewed(rank: int, world: int, case: str) -> dict[str, object]:
    """Hand-made routing: the dispatcher alone, with experts whose output identifies them."""
    mesh = init_device_mesh("cpu", (world,))
    E, T, K = 4, 6, 2
    experts = GroupedExperts(E, DIM, 8, impl="loop")
    experts.init_weights(0.3, 0.3, torch.Generator().manual_seed(5))
    reference_experts = GroupedExperts(E, DIM, 8, impl="loop")
    reference_experts.load_state_dict(experts.state_dict())
    shard_experts_(experts, mesh)
    x = torch.randn(T, DIM, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    if case == "one_expert":  # every token of every rank to expert 3 (and 2): rank 0 receives nothing
        ids = torch.tensor([[3, 2]] * T)
    elif case == "rank1_sends_nothing":  # rank 1 has no tokens at all
        T = 0 if rank == 1 else T
        x = x[:T].detach().requires_grad_(True)
        ids = torch.tensor([[0, 3]] * T, dtype=torch.int64).reshape(T, K)
    else:  # experts 1 and 2 get nothing
        ids = torch.tensor([[0, 3]] * T)
    weights = torch.full((T, K), 0.5)
    dispatcher = AllToAllDispatcher(E, mesh.get_group())
    x_MD, counts, ctx = dispatcher.dispatch(x, ids, weights)
    y = dispatcher.combine(experts(x_MD, counts), ctx)
    y.sum().backward()
    local = LocalDispatcher(E)
    x_ref, counts_ref, ctx_ref = local.dispatch(x.detach(), ids, weights)
    y_ref = local.combine(reference_experts(x_ref, counts_ref), ctx_ref)
    return {"y": y.detach(), "y_ref": y_ref.detach(), "counts": counts.tolist(), "x_grad": x.grad}


@pytest.mark.parametrize("case", SKEWED_CASES)
def test_skewed_routing_does_not_hang_and_is_exact(
    case: str, shared_ranks: Callable[[int, str], list[Any]]
) -> None:
    results = [by_case[case] for by_case in shared_ranks(2, "expert_parallel/cases")]
    for res in results:
        torch.testing.assert_close(res["y"], res["y_ref"], rtol=1e-5, atol=1e-6)
        assert res["x_grad"] is not None and torch.isfinite(res["x_grad"]).all()
    if case == "one_expert":
        assert results[0]["counts"] == [0, 0]  # rank 0 (experts 0, 1) receives nothing
        assert results[1]["counts"] == [12, 12]  # rank 1 gets both ranks' tokens for experts 2 and 3
    if case == "idle_experts":
        assert results[0]["counts"] == [12, 0] and results[1]["counts"] == [0, 12]
