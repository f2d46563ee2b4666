"""The MoE block contract and the core layer's extension points: every block is checked against ``MoEBlock`` when
the model is built, dispatch observers see exactly what the dispatcher gets, several routing sites come from the
``routers`` argument, and the core shared-expert options are checked when typed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from framework.config import ConfigError, ModelConfig, MoEConfig, resolve
from framework.models import Transformer, default_registry
from framework.models.moe import MoEBlock, MoELayer, build_topk_router, missing_block_members

MODEL = ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=8)


def _moe(**overrides: Any) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 8, **overrides})


def test_the_core_layer_meets_the_contract_and_a_partial_block_is_refused_naming_what_is_missing() -> None:
    layer = MoELayer(16, _moe())
    assert isinstance(layer, MoEBlock) and missing_block_members(layer) == []

    class Incomplete(nn.Module):
        """A block with a forward and the trainer's four calls only (the old, partial protocol)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def pop_aux_losses(self) -> dict[str, torch.Tensor]:
            return {}

        def consume_expert_counts(self) -> torch.Tensor:
            return torch.zeros(4, dtype=torch.int64)

        def update_expert_bias(self, counts: torch.Tensor) -> None:
            pass

        def routing_stats(self, reset: bool = True) -> dict[str, float | list[int]]:
            return {}

    registry = default_registry()
    registry.register("moe_block", "incomplete", lambda dim, cfg, reg: Incomplete(), owner="test")
    with pytest.raises(TypeError) as err:
        Transformer(MODEL, _moe(block="incomplete"), registry)
    message = str(err.value)
    assert message.startswith("moe_block 'incomplete' built Incomplete, which lacks ")
    for member in ("num_experts", "experts", "dispatcher", "site_routers", "register_dispatch_observer"):
        assert member in message
    assert "pop_aux_losses" not in message


def test_dispatch_observers_see_what_the_dispatcher_gets_until_removed() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, _moe())
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    dispatched: list[tuple[torch.Tensor, ...]] = []
    real = layer.dispatcher.dispatch
    layer.dispatcher.dispatch = lambda x, ids, w: dispatched.append((x, ids, w)) or real(x, ids, w)  # type: ignore[method-assign]
    seen: list[tuple[torch.Tensor, ...]] = []
    handle = layer.register_dispatch_observer(lambda x, ids, w: seen.append((x, ids, w)))
    x = torch.randn(2, 3, 16)
    layer(x)
    assert len(seen) == len(dispatched) == 1
    assert all(a is b for a, b in zip(seen[0], dispatched[0]))
    assert seen[0][0].shape == (6, 16) and seen[0][1].shape == (6, 2)
    handle.remove()
    layer(x)
    assert len(seen) == 1 and len(dispatched) == 2


def test_routers_argument_makes_one_routing_site_per_router() -> None:
    cfg = _moe(bias_update_rate=0.1)
    routers = [build_topk_router(16, cfg) for _ in range(3)]
    layer = MoELayer(16, cfg, routers=routers)
    assert layer.site_routers() == routers and not hasattr(layer, "router")
    assert layer.active_experts_per_token == 3 * cfg.top_k
    assert [n for n, _ in layer.named_children()][0] == "routers"
    with pytest.raises(ValueError, match="either one `router` or a non-empty `routers` list"):
        MoELayer(16, cfg, router=routers[0], routers=routers)


@pytest.mark.parametrize(
    "moe, key",
    [
        ({"shared_expert_hidden": 32}, "moe.shared_expert_hidden"),
        ({"shared_expert_gate": True}, "moe.shared_expert_gate"),
    ],
)
def test_shared_expert_options_without_shared_experts_are_refused(moe: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve({"moe": moe}, {})
    assert err.value.key == key and "set moe.shared_experts >= 1" in str(err.value)


def test_shared_experts_are_built_initialised_and_added_to_every_token() -> None:
    """``y = routed + gate · shared``: the core layer's output minus its routed part is the shared experts' output."""
    cfg = _moe(shared_experts=2, shared_expert_gate=True)
    layer = MoELayer(16, cfg)
    assert layer.shared_experts is not None and layer.shared_experts.hidden == 2 * 8
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    assert all(p.abs().sum() > 0 for p in layer.shared_experts.parameters())
    x_TD = torch.randn(5, 16)
    with torch.no_grad():
        routed = layer.route_and_compute(x_TD, layer.router, 0, 1, 5, None)
        y = layer(x_TD.view(1, 5, 16)).view(5, 16)
    # fp32: (routed + shared) - routed differs from shared by the rounding of a sum of magnitude ~1.
    torch.testing.assert_close(y - routed, layer.shared_experts(x_TD), rtol=1e-6, atol=1e-6)
