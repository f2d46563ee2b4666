"""RoutingState, the trainer's routing bookkeeping after each optimizer step (one process: the all-reduce is the
identity): counts of the step's training forwards only, the aux-free bias step from them, the metrics, and nothing
kept from evaluation forwards. References are recomputed from the routers' own choices."""

from __future__ import annotations

import torch
from models_testutil import model_cfg, moe_cfg

from framework.models import Transformer
from framework.models.moe.routing_state import RoutingState


def _routed_counts(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's int64 tokens per expert for one forward of ``ids``, from its router's top-k (recorded by a
    forward hook on the router, so the reference does not use the layer's own counting)."""
    chosen: list[torch.Tensor] = []
    handles = [
        layer.router.register_forward_hook(lambda _m, _a, out: chosen.append(out.topk_ids_TK.reshape(-1)))
        for layer in model.moe_layers()
    ]
    model.train()
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    E = model.moe_layers()[0].num_experts
    return [torch.bincount(c, minlength=E) for c in chosen]


def test_counts_bias_step_and_metrics_of_the_training_forwards_only() -> None:
    rate = 1e-2
    model = Transformer(model_cfg(n_layers=2), moe_cfg(num_experts=4, top_k=2, bias_update_rate=rate))
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _routed_counts(
        model, ids
    )  # the forward is deterministic: the training forward routes the same
    model.discard_routing_state()
    routing = RoutingState(model, ep=1, dispatch_row_bytes=256)
    biases_before = [layer.router.expert_bias.clone() for layer in model.moe_layers()]

    model.train()
    model(ids)
    model.eval()
    with torch.no_grad():
        model(ids)  # an evaluation forward: not counted
    routing.after_optimizer_step(torch.device("cpu"))

    assert [c.tolist() for c in routing.last_counts] == [c.tolist() for c in expected]
    for layer, before, counts in zip(model.moe_layers(), biases_before, expected):
        step = torch.sign(counts.double().mean() - counts.double()).float() * rate
        torch.testing.assert_close(layer.router.expert_bias, before + step, rtol=0, atol=0)
    metrics = routing.metrics()
    for i, counts in enumerate(expected):
        assert [metrics[f"moe/layer{i}/tokens_e{e}"] for e in range(4)] == counts.double().tolist()
        assert metrics[f"moe/layer{i}/max_over_mean"] == float(counts.max() / counts.double().mean())
    assert not any(k.startswith("moe/a2a") for k in metrics)  # no expert parallelism

    # Sampling or evaluation forwards in training mode are forgotten by discard(): the next step counts from zero.
    model.train()
    with torch.no_grad():
        model(ids)
    routing.discard()
    routing.after_optimizer_step(torch.device("cpu"))
    assert all(int(c.sum()) == 0 for c in routing.last_counts)
