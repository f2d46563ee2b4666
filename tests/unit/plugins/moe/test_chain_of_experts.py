"""Chain-of-Experts block: equivalences with the plain MoE layer and a hand-written loop, per-iteration routing state,
the plugin's config checks and its wiring into the transformer.

Tolerances: paths that run the same ops in the same order are compared exactly; the hand-written loop computes the
experts densely (einsum over all experts, then a gather), which reorders fp32 sums, so it is compared to rtol 1e-5 and
atol 1e-5 x the largest |value| (activations grow to ~70 through the chain; the rounding of every sum scales with
them: measured at most 9e-7 x the largest value over 30 seeds, ~8 ulps).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from framework.config import ConfigError, resolve
from framework.config.sections import MoEConfig
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from framework.models.moe.balancing import load_balance_loss, router_z_loss, sequence_load_balance_loss
from framework.models.moe.experts import GroupedExperts
from framework.models.moe.layer import MoELayer
from framework.models.moe.router import RouterOutput
from plugins.moe.chain_of_experts import ChainOfExpertsConfig, ChainOfExpertsLayer, ChainOfExpertsPlugin

DIM, B, S = 16, 2, 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _moe(**overrides: Any) -> MoEConfig:
    args: dict[str, Any] = dict(num_experts=4, top_k=2, expert_hidden=24)
    args.update(overrides)
    return MoEConfig(**args)


def _layer(moe: MoEConfig, seed: int = 0, **coe: Any) -> ChainOfExpertsLayer:
    layer = ChainOfExpertsLayer(DIM, moe, ChainOfExpertsConfig(**coe))
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(seed))
    return layer


def _capture_routing(layer: ChainOfExpertsLayer) -> list[RouterOutput]:
    """Every router output of the layer's forwards, in call order."""
    seen: list[RouterOutput] = []
    for router in layer.routers:
        router.register_forward_hook(lambda module, args, out: seen.append(out))
    return seen


def _dense_experts(experts: GroupedExperts, x_TD: torch.Tensor, routed: RouterOutput) -> torch.Tensor:
    """``Σ_k g_k · E_{id_k}(x)`` written out: every expert on every token, then the chosen ones gathered."""
    gate_up_E2IH, down_EHI = experts.gate_up_proj, experts.down_proj
    gate_TEI = torch.einsum("td,eid->tei", x_TD, gate_up_E2IH[:, 0])
    up_TEI = torch.einsum("td,eid->tei", x_TD, gate_up_E2IH[:, 1])
    y_TED = torch.einsum("tei,edi->ted", F.silu(gate_TEI) * up_TEI, down_EHI)
    ids_TK = routed.topk_ids_TK
    chosen_TKD = y_TED.gather(1, ids_TK.unsqueeze(-1).expand(-1, -1, x_TD.shape[-1]))
    return (routed.topk_weights_TK.unsqueeze(-1) * chosen_TKD).sum(dim=1)


# --- the layer --------------------------------------------------------------------------------------------------


def test_one_outer_iteration_is_the_plain_moe_layer() -> None:
    """C = 1 with the outer residual is exactly a top-k MoE: forward, aux losses, counts and gradients."""
    moe = _moe(aux_loss_coef=0.01, seq_aux_loss_coef=0.001, z_loss_coef=0.001, bias_update_rate=0.01)
    plain = MoELayer(DIM, moe)
    plain.init_weights(0.3, 0.3, torch.Generator().manual_seed(1))
    coe = ChainOfExpertsLayer(DIM, moe, ChainOfExpertsConfig(iterations=1, residual="outer"))
    state = {k.replace("router.", "routers.0."): v for k, v in plain.state_dict().items()}
    coe.load_state_dict(state)
    assert not coe.owns_residual and coe.top_k == plain.top_k == 2

    x = torch.randn(B, S, DIM)
    x_plain, x_coe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_coe = plain(x_plain), coe(x_coe)
    assert torch.equal(y_plain, y_coe)
    aux_plain, aux_coe = plain.pop_aux_losses(), coe.pop_aux_losses()
    assert set(aux_coe) == {"load_balance", "seq_load_balance", "router_z"}
    for name, value in aux_plain.items():
        assert torch.equal(value, aux_coe[name]), name
    assert torch.equal(plain.consume_expert_counts(), coe.consume_expert_counts())

    (y_plain.square().sum() + sum(aux_plain.values())).backward()
    (y_coe.square().sum() + sum(aux_coe.values())).backward()
    assert torch.equal(x_plain.grad, x_coe.grad)
    assert torch.equal(plain.router.gate.weight.grad, coe.routers[0].gate.weight.grad)
    assert torch.equal(plain.experts.gate_up_proj.grad, coe.experts.gate_up_proj.grad)
    assert torch.equal(plain.experts.down_proj.grad, coe.experts.down_proj.grad)


@pytest.mark.parametrize("residual", ["inner", "inner_no_h", "outer"])
def test_two_iterations_match_a_hand_written_loop(residual: str) -> None:
    """x⁰ = input; xᵗ = [xᵗ⁻¹ +] Σ g_t·E(x̂ᵗ⁻¹) + shared(x̂ᵗ⁻¹) with router t and the same experts (x̂ = x, or its RMS
    normalisation from t = 2 on for outer); output x^C − x⁰ (inner: the block adds h) or x^C."""
    layer = _layer(_moe(shared_experts=1, shared_expert_gate=True), iterations=2, residual=residual)
    assert layer.owns_residual == (residual == "inner_no_h")
    assert layer.routers[0].top_k == layer.routers[1].top_k == 1
    assert not torch.equal(layer.routers[0].gate.weight, layer.routers[1].gate.weight)
    x_BSD = torch.randn(B, S, DIM)

    x0_TD = x_TD = x_BSD.reshape(B * S, DIM)
    with torch.no_grad():
        for t, router in enumerate(layer.routers):
            if residual == "outer" and t > 0:
                x_TD = x_TD / x_TD.square().mean(-1, keepdim=True).add(1e-12).sqrt()
            f_TD = _dense_experts(layer.experts, x_TD, router(x_TD)) + layer.shared_experts(x_TD)
            x_TD = f_TD if residual == "outer" else x_TD + f_TD
        y_BSD = layer(x_BSD)
    expected = (x_TD - x0_TD if residual == "inner" else x_TD).view(B, S, DIM)
    torch.testing.assert_close(y_BSD, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("residual", ["inner", "outer"])
def test_one_iteration_of_the_block_forms_adding_h_is_the_core_moe_model(residual: str) -> None:
    """The like-for-like forms: a whole model with C = 1 (inner or outer) gives the core MoE model's logits and
    gradients bit for bit from the same weights (same ops in the same order; inner returns Σ f, not x^C − x⁰)."""
    pm, _ = _plugin()
    job = _job(chain_of_experts=dict(iterations=1, residual=residual), moe=dict(route_norm=False))
    coe_cfg = resolve(job, pm.config_sections)
    pm.hook.expertrain_validate_config(config=coe_cfg, world_size=1)
    core_cfg = resolve({**job, "plugins": [], "moe": {**job["moe"], "block": "moe"}}, pm.config_sections)
    coe = Transformer(coe_cfg.model, coe_cfg.moe, pm.registry)
    core = Transformer(core_cfg.model, core_cfg.moe, default_registry())
    core.init_weights(3)
    coe.load_state_dict({k.replace(".router.", ".routers.0."): v for k, v in core.state_dict().items()})
    tokens = torch.randint(0, 64, (B, S))
    logits_coe, logits_core = coe(tokens), core(tokens)
    assert torch.equal(logits_coe, logits_core)
    logits_coe.square().mean().backward()
    logits_core.square().mean().backward()
    grads_core = {k.replace(".router.", ".routers.0."): p.grad for k, p in core.named_parameters()}
    for name, param in coe.named_parameters():
        assert torch.equal(param.grad, grads_core[name]), name


def _initialised_block_input(residual: str) -> tuple[ChainOfExpertsLayer, torch.Tensor]:
    """Layer 0's CoE block of a model given the trainer's init (depth-scaled expert output std), and its normed input
    for a random h of unit RMS."""
    pm, _ = _plugin()
    config = resolve(
        _job(chain_of_experts=dict(residual=residual), moe=dict(route_norm=False), model=dict(n_layers=8)),
        pm.config_sections,
    )
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    block = model.layers[0]
    return block.ffn, block.ffn_norm(torch.randn(4, S, DIM))


def test_outer_ablation_second_iteration_is_live_at_init() -> None:
    """outer: x² = f_2(rms(x¹)) has an RMS of the order of x¹'s (within 10×) at the trainer's init; without the norm
    between iterations (f_2 applied to x¹ itself) it would be orders of magnitude smaller, the dead iteration the
    norm is there to avoid."""
    layer, x0_BSD = _initialised_block_input("outer")
    rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
    with torch.no_grad():
        x0_TD = x0_BSD.reshape(-1, DIM)
        x1_TD = layer.route_and_compute(x0_TD, layer.routers[0], 0, 4, S, None)
        x2_TD = layer(x0_BSD).reshape(-1, DIM)
        x1n_TD = x1_TD / x1_TD.square().mean(-1, keepdim=True).add(1e-12).sqrt()
        expected = layer.route_and_compute(x1n_TD, layer.routers[1], 1, 4, S, None)
        unnormed = layer.route_and_compute(x1_TD, layer.routers[1], 1, 4, S, None)
    torch.testing.assert_close(x2_TD, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert 0.1 < rms(x2_TD) / rms(x1_TD) < 10, (rms(x1_TD), rms(x2_TD))
    assert rms(unnormed) / rms(x1_TD) < 1e-2, (rms(x1_TD), rms(unnormed))


def test_counts_and_bias_updates_are_per_iteration() -> None:
    layer = _layer(_moe(bias_update_rate=0.1), iterations=2)
    seen = _capture_routing(layer)
    layer(torch.randn(B, S, DIM))
    layer(torch.randn(B, S, DIM))  # counts accumulate over micro-batches until consumed

    counts = layer.consume_expert_counts()
    assert counts.shape == (2, 4) and counts.dtype == torch.int64
    assert counts.sum(dim=1).tolist() == [2 * B * S * 1] * 2  # two forwards, top-1 per iteration
    for t in range(2):  # call order: forward 1 iter 0, iter 1, forward 2 iter 0, iter 1
        ids = torch.cat([seen[t].topk_ids_TK, seen[2 + t].topk_ids_TK])
        assert counts[t].tolist() == torch.bincount(ids.flatten(), minlength=4).tolist()
    assert layer.consume_expert_counts().sum() == 0, "consumed counts restart from zero"

    # b_t += rate * sign(mean(c_t) - c_t), each router from its own iteration's counts.
    layer.update_expert_bias(torch.tensor([[5, 1, 1, 1], [1, 1, 1, 5]]))
    assert layer.routers[0].expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert layer.routers[1].expert_bias.tolist() == pytest.approx([0.1, 0.1, 0.1, -0.1])
    assert layer.routing_site_names() == ["iter0", "iter1"]


def test_aux_losses_are_summed_over_iterations_and_reach_every_router() -> None:
    moe = _moe(aux_loss_coef=0.01, seq_aux_loss_coef=0.002, z_loss_coef=0.001)
    layer = _layer(moe, iterations=2, residual="inner")
    seen = _capture_routing(layer)
    layer(torch.randn(B, S, DIM))
    aux = layer.pop_aux_losses()

    expected = {"load_balance": 0.0, "seq_load_balance": 0.0, "router_z": 0.0}
    for routed in seen:
        expected["load_balance"] += 0.01 * load_balance_loss(routed.scores_TE, routed.topk_ids_TK, 4)
        expected["seq_load_balance"] += 0.002 * sequence_load_balance_loss(
            routed.scores_TE.view(B, S, 4), routed.topk_ids_TK.view(B, S, 1), 4
        )
        expected["router_z"] += 0.001 * router_z_loss(routed.logits_TE)
    assert len(seen) == 2 and set(aux) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(aux[name], value, rtol=1e-6, atol=0)  # same ops, same order

    sum(aux.values()).backward()
    for router in layer.routers:
        assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_active_experts_per_token_is_top_k_and_init_is_deterministic() -> None:
    moe = _moe(num_experts=8, top_k=4, shared_experts=2)
    layer = _layer(moe, seed=3, iterations=2)
    assert layer.top_k == 2 and layer.active_experts_per_token == 4
    assert layer.shared_experts is not None and layer.shared_experts.hidden == 2 * 24
    again = _layer(moe, seed=3, iterations=2)
    other = _layer(moe, seed=4, iterations=2)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
        if "weight" in name or "proj" in name:
            assert not torch.equal(value, other.state_dict()[name]), f"{name} not drawn from the generator"


@pytest.mark.parametrize("route_norm", [True, False])
def test_one_renormalised_expert_per_iteration_leaves_the_routers_without_lm_gradient(
    route_norm: bool,
) -> None:
    """Why the plugin warns about top-1 iterations with ``route_norm``: the gate ``w / (w + 1e-20)`` is 1, so the LM
    loss (here any function of the output; no aux losses) gives the routers no gradient. Measured against the
    experts' gradient scale: ~1e-8 of it with route_norm (fp32 rounding of that quotient), ~0.4 without."""
    layer = _layer(_moe(route_norm=route_norm, aux_loss_coef=0.0), iterations=2)
    layer(torch.randn(B, S, DIM)).square().sum().backward()
    scale = float(layer.experts.down_proj.grad.abs().max())
    for router in layer.routers:
        ratio = float(router.gate.weight.grad.abs().max()) / scale
        assert ratio < 1e-6 if route_norm else ratio > 1e-2


def test_layer_refuses_iterations_that_do_not_divide_top_k() -> None:
    with pytest.raises(ValueError, match="divide moe.top_k=2"):
        ChainOfExpertsLayer(DIM, _moe(), ChainOfExpertsConfig(iterations=3))


# --- the plugin -------------------------------------------------------------------------------------------------


def _job(**sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "plugins": ["chain_of_experts"],
        "model": dict(
            vocab_size=64, dim=DIM, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=S
        ),
        "moe": dict(block="chain_of_experts", num_experts=4, top_k=2, expert_hidden=24),
        "data": dict(seq_len=S),
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def _plugin() -> tuple[PluginManager, ChainOfExpertsPlugin]:
    pm = PluginManager(default_registry())
    plugin = ChainOfExpertsPlugin()
    pm.register_object("chain_of_experts", plugin)
    return pm, plugin


@pytest.mark.parametrize("residual", ["inner", "inner_no_h", "outer"])
def test_plugin_builds_the_block_from_the_job_section(residual: str) -> None:
    pm, plugin = _plugin()
    config = resolve(
        _job(chain_of_experts=dict(residual=residual), moe=dict(shared_experts=1, shared_expert_hidden=40)),
        pm.config_sections,
    )
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    with torch.device("meta"):  # the trainer's path: meta build, to_empty, deterministic init
        model = Transformer(config.model, config.moe, pm.registry)
    model.to_empty(device="cpu")
    model.init_weights(0)
    direct = Transformer(config.model, config.moe, pm.registry)
    direct.init_weights(0)
    for name, value in direct.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name

    layers = model.moe_layers()
    assert len(layers) == 2 and all(isinstance(layer, ChainOfExpertsLayer) for layer in layers)
    assert layers[0].shared_experts.hidden == 40 and len(layers[0].routers) == 2
    # The block: inner_no_h -> out = x^C from norm(h) (no h added); inner, outer -> out = h + ffn.
    block = model.layers[0]
    x = torch.randn(B, S, DIM)
    with torch.no_grad():
        h = x + block.attention(block.attention_norm(x), model.rope_cos, model.rope_sin)
        ffn = block.ffn(block.ffn_norm(h))
        out = block(x, model.rope_cos, model.rope_sin)
    assert torch.equal(out, ffn if residual == "inner_no_h" else h + ffn)


@pytest.mark.parametrize(
    "moe, warned",
    [
        ({}, True),  # top-2 as 2 x top-1, softmax renormalised
        ({"route_norm": False}, False),
        ({"score_func": "sigmoid", "route_norm": False}, True),  # sigmoid gates are always renormalised
        ({"top_k": 4}, False),  # 2 experts per iteration: the gates keep their relative scores
    ],
)
def test_constant_gates_are_warned_once_per_model(
    moe: dict[str, Any], warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    pm, _ = _plugin()
    config = resolve(_job(moe=moe), pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    Transformer(config.model, config.moe, pm.registry)  # two MoE layers
    err = capsys.readouterr().err
    assert err.count("renormalises its gate weight") == (1 if warned else 0), err


def test_building_before_validation_is_a_clear_error() -> None:
    pm, _ = _plugin()
    config = resolve(_job(), pm.config_sections)
    with pytest.raises(RuntimeError, match="before the job config was validated"):
        Transformer(config.model, config.moe, pm.registry)


@pytest.mark.parametrize(
    "sections, key, expected",
    [
        ({"chain_of_experts": {"iterations": 3}}, "chain_of_experts.iterations", "divisor of moe.top_k=2"),
        ({"moe": {"block": "moe"}}, "moe.block", "set `moe.block: chain_of_experts`"),
        ({"moe": {"num_experts": 0}}, "moe.num_experts", "every layer dense"),
    ],
)
def test_job_checks_name_the_key_and_the_fix(sections: dict[str, Any], key: str, expected: str) -> None:
    pm, plugin = _plugin()
    config = resolve(_job(**sections), pm.config_sections)
    with pytest.raises(ConfigError, match="reported by plugin 'chain_of_experts'") as err:
        pm.hook.expertrain_validate_config(config=config, world_size=1)
    assert err.value.key == key and expected in str(err.value)
    assert plugin.config is None, "a rejected job must not configure the plugin"


@pytest.mark.parametrize(
    "values, key, expected",
    [
        ({"iterations": 0}, "chain_of_experts.iterations", ">= 1"),
        ({"residual": "both"}, "chain_of_experts.residual", "'inner', 'inner_no_h', 'outer'"),
        # Shared experts are the core's moe.shared_* keys now: an old job file's keys name their new place.
        (
            {"shared_expert_hidden": 64},
            "chain_of_experts.shared_expert_hidden",
            "moved to 'moe.shared_expert_hidden'",
        ),
        (
            {"shared_expert_gate": True},
            "chain_of_experts.shared_expert_gate",
            "moved to 'moe.shared_expert_gate'",
        ),
        ({"n_shared_experts": 1}, "chain_of_experts.n_shared_experts", "moved to 'moe.shared_experts'"),
    ],
)
def test_section_values_are_checked_when_the_job_is_typed(
    values: dict[str, Any], key: str, expected: str
) -> None:
    pm, _ = _plugin()
    with pytest.raises(ConfigError) as err:
        resolve(_job(chain_of_experts=values), pm.config_sections)
    assert err.value.key == key and expected in str(err.value)
