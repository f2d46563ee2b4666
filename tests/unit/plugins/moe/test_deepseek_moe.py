"""The deepseek_moe plugin: segmentation/isolation arithmetic, the balance losses against the paper's formulas, job
validation, DeepSeek-V3 mode through the real Transformer, and numerical parity with transformers' DeepseekV3MoE and
Qwen2MoeSparseMoeBlock (forward, input and weight gradients)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.config import ConfigError, JobConfig, MoEConfig, load_raw, resolve
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from framework.models.moe import MoELayer, TopKRouter, load_balance_loss
from plugins.moe.deepseek_moe import (
    DeepSeekMoEConfig,
    DeepSeekMoELayer,
    DeepSeekMoEPlugin,
    deepseek_shape,
    device_balance_loss,
)

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# A valid base job: N=4 experts of hidden 32, top-2, split 2 ways with 2 isolated shared experts
# -> 6 routed experts of hidden 16, top-2, shared hidden 32.
BASE: dict[str, Any] = {
    "plugins": ["deepseek_moe"],
    "model": {"vocab_size": 64, "dim": 16, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
    "moe": {"block": "deepseek_moe", "num_experts": 4, "top_k": 2, "expert_hidden": 32, "shared_experts": 2},
    "data": {"seq_len": 16},
    "deepseek_moe": {"segments": 2},
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in override.items():
        if isinstance(values, dict):
            out.setdefault(section, {}).update(values)
        else:
            out[section] = values
    return out


def _job(override: dict[str, Any] | None = None, world_size: int = 1) -> tuple[JobConfig, PluginManager]:
    """Type and validate a job through a plugin manager holding a fresh plugin object, as load_job does."""
    pm = PluginManager(default_registry())
    pm.register_object("deepseek_moe", DeepSeekMoEPlugin())
    config = resolve(_merge(BASE, override or {}), pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=world_size)
    return config, pm


# --- arithmetic ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segments, shared, isolate, hidden_override, expected",
    [
        (2, 2, True, 0, (6, 2, 16, 32)),  # paper: m*N - Ks routed, m*K - Ks active
        (2, 2, False, 0, (8, 4, 16, 32)),  # HF convention: shared on top
        (1, 1, True, 0, (3, 1, 32, 32)),
        (4, 1, True, 0, (15, 7, 8, 8)),
        (2, 0, True, 0, (8, 4, 16, 0)),  # segmentation only
        (1, 1, False, 40, (4, 2, 32, 40)),  # Qwen2-MoE: shared_expert_intermediate_size
    ],
)
def test_segmentation_and_isolation_arithmetic(
    segments: int, shared: int, isolate: bool, hidden_override: int, expected: tuple[int, int, int, int]
) -> None:
    moe = MoEConfig(
        num_experts=4, top_k=2, expert_hidden=32, shared_experts=shared, shared_expert_hidden=hidden_override
    )
    cfg = DeepSeekMoEConfig(segments=segments, isolate_shared=isolate)
    shape = deepseek_shape(moe, cfg)
    assert (shape.routed_experts, shape.routed_top_k, shape.expert_hidden, shape.shared_hidden) == expected
    if isolate and not hidden_override:
        # Constant compute and constant parameters: the activated hidden units and the total expert hidden units
        # are those of the unsegmented top-K MoE (K*I and N*I).
        assert shape.routed_top_k * shape.expert_hidden + shape.shared_hidden == moe.top_k * moe.expert_hidden
        assert (
            shape.routed_experts * shape.expert_hidden + shape.shared_hidden
            == moe.num_experts * moe.expert_hidden
        )


def test_block_from_the_job_has_the_effective_shape_and_counts() -> None:
    config, pm = _job({"moe": {"first_k_dense": 1}})
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    assert not model.layers[0].is_moe
    layer = model.layers[1].ffn
    assert isinstance(layer, DeepSeekMoELayer)
    assert (layer.num_experts, layer.top_k, layer.experts.hidden) == (6, 2, 16)
    assert layer.router.num_experts == 6 and layer.shared_experts is not None
    assert layer.shared_experts.hidden == 32 and layer.active_experts_per_token == 2
    # Shared experts are always active: only the 6 - 2 routed experts a token skips are inactive.
    counts = model.param_counts()
    per_expert = 3 * 16 * 16  # gate, up, down of dim 16 x hidden 16
    assert counts["total"] - counts["active_per_token"] == 2 * per_expert * (6 - 2)

    x = torch.randn(2, 5, 16)
    layer.train()
    layer(x)
    routed = layer.consume_expert_counts()
    assert routed.shape == (6,) and routed.dtype == torch.int64 and int(routed.sum()) == 2 * 5 * 2


def test_init_is_deterministic_and_covers_the_shared_experts() -> None:
    config, pm = _job({"moe": {"shared_expert_gate": True}})
    a, b = (Transformer(config.model, config.moe, pm.registry) for _ in range(2))
    for m in (a, b):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float("nan"))
        m.init_weights(3)
    shared = a.layers[0].ffn.shared_experts
    for name in ("gate_proj", "up_proj", "down_proj", "gate"):
        w = getattr(shared, name).weight
        assert torch.isfinite(w).all() and w.std() > 0, name
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    # The down projection gets the scaled output std (like every other output projection).
    assert shared.down_proj.weight.std() < shared.up_proj.weight.std()


# --- balance losses -----------------------------------------------------------------------------------------------


def _card_losses(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, devices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeekMoE card's formulas written out term by term: expert-level Σ_i f_i·P_i and device-level
    Σ_d f′_d·P′_d with f_i = N′/(K′T)·Σ_t 1(t picks i), P_i = (1/T)·Σ_t s_{i,t}."""
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    f = [E / (K * T) * sum(int(i in ids_TK[t].tolist()) for t in range(T)) for i in range(E)]
    P = [probs_TE[:, i].sum() / T for i in range(E)]
    expert_level = sum(f[i] * P[i] for i in range(E))
    per = E // devices
    device_level = sum(
        (sum(f[i] for i in range(d * per, (d + 1) * per)) / per)
        * sum(P[i] for i in range(d * per, (d + 1) * per))
        for d in range(devices)
    )
    return expert_level, device_level


def test_device_balance_loss_matches_the_card_formula() -> None:
    probs_TE = torch.rand(12, 6, dtype=torch.float64).softmax(-1)
    ids_TK = torch.stack([torch.randperm(6)[:2] for _ in range(12)])
    _, expected = _card_losses(probs_TE, ids_TK, devices=3)
    # float64 throughout: only summation order differs.
    torch.testing.assert_close(device_balance_loss(probs_TE, ids_TK, 6, 3), expected, rtol=1e-12, atol=0)
    # One expert per device is the expert-level loss.
    torch.testing.assert_close(
        device_balance_loss(probs_TE, ids_TK, 6, 6),
        load_balance_loss(probs_TE, ids_TK, 6),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_layer_aux_terms_are_the_card_losses_on_the_routed_experts(score_func: str) -> None:
    """α1 (the core's moe.aux_loss_coef term, with N′ and K′) and α2 (device_balance) equal the card's formulas."""
    moe = MoEConfig(
        num_experts=4, top_k=2, expert_hidden=32, score_func=score_func, aux_loss_coef=0.003, shared_experts=2
    )
    settings = DeepSeekMoEConfig(segments=2, device_aux_loss_coef=0.05)
    layer = DeepSeekMoELayer(16, moe, settings, num_devices=3)
    layer.init_weights(0.5, 0.5, torch.Generator().manual_seed(0))
    x = torch.randn(2, 6, 16)
    layer(x)
    aux = layer.pop_aux_losses()
    assert set(aux) == {"load_balance", "device_balance"}
    routed = layer.router(x.view(-1, 16))
    probs = routed.scores_TE
    if score_func == "sigmoid":  # DeepSeek-V3 normalises sigmoid scores per token for the balance losses
        probs = probs / probs.sum(-1, keepdim=True)
    expert_level, device_level = _card_losses(probs.double(), routed.topk_ids_TK, devices=3)
    # fp32 losses vs a float64 re-computation of the same fp32 probabilities: a few ulp.
    torch.testing.assert_close(aux["load_balance"].double(), 0.003 * expert_level, rtol=1e-6, atol=0)
    torch.testing.assert_close(aux["device_balance"].double(), 0.05 * device_level, rtol=1e-6, atol=0)
    # The term reaches the router (it is a loss, not a metric).
    aux["device_balance"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_one_device_leaves_the_constant_device_loss_out() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    layer = DeepSeekMoELayer(16, moe, DeepSeekMoEConfig(segments=2, device_aux_loss_coef=0.05), num_devices=1)
    layer.init_weights(0.5, 0.5, torch.Generator().manual_seed(0))
    layer(torch.randn(2, 6, 16))
    assert "device_balance" not in layer.pop_aux_losses()


# --- DeepSeek-V3 mode -----------------------------------------------------------------------------------------------

V3 = {
    "moe": {
        "num_experts": 4,
        "top_k": 2,
        "score_func": "sigmoid",
        "bias_update_rate": 0.001,
        "aux_loss_coef": 0.0,
        "seq_aux_loss_coef": 0.0001,
        "n_groups": 2,
        "topk_groups": 1,
        "route_scale": 2.5,
        "first_k_dense": 1,
        "shared_experts": 2,
    },
    "deepseek_moe": {"segments": 2, "device_aux_loss_coef": 0.05, "devices": 2},
}


def test_v3_mode_trains_through_the_model() -> None:
    config, pm = _job(V3)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    layers = model.moe_layers()
    assert len(layers) == 2 and all(isinstance(m, DeepSeekMoELayer) for m in layers)
    router = layers[0].router
    assert isinstance(router, TopKRouter)
    assert (router.num_experts, router.top_k, router.n_groups, router.topk_groups) == (6, 2, 2, 1)
    assert router.route_scale == 2.5 and router.expert_bias is not None

    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    aux = model.aux_losses()
    assert set(aux) == {"seq_load_balance", "device_balance"}
    (logits.logsumexp(-1).mean() + sum(aux.values())).backward()
    for name in ("shared_experts.gate_proj.weight", "router.gate.weight", "experts.gate_up_proj"):
        assert layers[0].get_parameter(name).grad.abs().sum() > 0, name

    with torch.no_grad():  # group-limited: every token's experts lie in topk_groups=1 of the 2 groups of 3
        routed = router(torch.randn(32, 16))
    group_TK = routed.topk_ids_TK // 3
    assert torch.equal(group_TK.min(-1).values, group_TK.max(-1).values)
    # Sigmoid gate weights are renormalised over the top-k, then scaled.
    torch.testing.assert_close(routed.topk_weights_TK.sum(-1), torch.full((32,), 2.5))

    counts = layers[0].consume_expert_counts()
    assert int(counts.sum()) == 2 * 16 * 2
    layers[0].update_expert_bias(counts)
    expected = torch.sign(counts.double().mean() - counts.double()).float() * 0.001
    torch.testing.assert_close(router.expert_bias, expected)
    assert "layers.1.ffn.router.expert_bias" in model.state_dict()


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, world_size, key, fix",
    [
        ({"moe": {"block": "moe"}}, 1, "moe.block", "set `moe.block: deepseek_moe`"),
        (
            {"deepseek_moe": {"segments": 3}},
            1,
            "deepseek_moe.segments",
            "expected a divisor of moe.expert_hidden=32",
        ),
        (
            {"moe": {"shared_experts": 4}},
            1,
            "moe.shared_experts",
            "expected fewer than deepseek_moe.segments*moe.top_k = 4",
        ),
        (
            {"moe": {"shared_experts": 1}, "parallel": {"ep": 2}},
            2,
            "parallel.ep",
            "expected a divisor of the 7 routed experts",
        ),
        ({"moe": {"n_groups": 4}}, 1, "moe.n_groups", "expected a divisor of the 6 routed experts"),
        (
            {"moe": {"top_k": 3, "n_groups": 2, "topk_groups": 1}},
            1,
            "moe.topk_groups",
            "at least the routed top-k 4",
        ),
        (
            {"deepseek_moe": {"devices": 4}},
            1,
            "deepseek_moe.devices",
            "expected a divisor of the 6 routed experts",
        ),
        (
            {"deepseek_moe": {"segments": 32}, "moe": {"shared_experts": 1}, "parallel": {"tp": 2}},
            2,
            "deepseek_moe.segments",
            "multiple of the expert tensor-parallel size 2",
        ),
        ({"moe": {"num_experts": 0}}, 1, "moe.num_experts", "builds MoE blocks"),
    ],
    ids=["block", "segments", "shared", "ep", "n_groups", "topk_groups", "devices", "etp", "dense"],
)
def test_bad_jobs_are_refused_naming_the_key_and_the_fix(
    override: dict[str, Any], world_size: int, key: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _job(override, world_size)
    assert info.value.key == key
    message = str(info.value)
    assert fix in message and "reported by plugin 'deepseek_moe'" in message, message


@pytest.mark.parametrize(
    "old, new", [("n_shared_experts", "shared_experts"), ("shared_expert_hidden", "shared_expert_hidden")]
)
def test_an_old_shared_expert_key_names_its_core_replacement(old: str, new: str) -> None:
    """Shared experts moved into the core MoE layer: an old job file's plugin key is refused naming moe.<new>."""
    with pytest.raises(ConfigError, match=rf"'deepseek_moe\.{old}': got 2; this key moved to 'moe\.{new}'"):
        _job({"deepseek_moe": {old: 2}})


def test_a_job_without_shared_experts_is_warned_of_the_former_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _job({"moe": {"shared_experts": 0}})
    assert "moe.shared_experts: 1" in capsys.readouterr().err
    _job()
    assert "moe.shared_experts" not in capsys.readouterr().err


def test_top_k_larger_than_the_routed_experts_is_refused() -> None:
    # The core refuses top_k > num_experts while typing a job; the block checks again for direct construction.
    moe = MoEConfig(num_experts=2, top_k=3, expert_hidden=32, shared_experts=1)
    with pytest.raises(ConfigError, match=r"'moe.top_k': got 3; .*top-5 over only 3 routed experts"):
        deepseek_shape(moe, DeepSeekMoEConfig(segments=2))


def test_block_needs_a_validated_job() -> None:
    with pytest.raises(RuntimeError, match="before plugin 'deepseek_moe' validated the job"):
        DeepSeekMoEPlugin().build_block(16, MoEConfig(block="deepseek_moe"), default_registry())


@pytest.mark.parametrize("name", ["deepseek_moe.yaml", "deepseek_v3_moe.yaml"])
def test_example_configs_load_through_the_entry_point(name: str) -> None:
    raw = load_raw(str(REPO / "examples" / "configs" / name), [])
    pm = PluginManager(default_registry())
    pm.load(raw["plugins"])  # the installed entry point, as `framework.train` loads it
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=2)
    assert config.moe.block == "deepseek_moe"
    with torch.device("meta"):
        model = Transformer(config.model, config.moe, pm.registry)
    assert all(isinstance(m, DeepSeekMoELayer) for m in model.moe_layers())


def test_docs_list_every_option() -> None:
    doc = (REPO / "docs" / "plugins" / "deepseek_moe.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `deepseek_moe\.(\w+)` \|", doc, flags=re.MULTILINE))
    assert documented == {f.name for f in dataclasses.fields(DeepSeekMoEConfig)}


# --- parity with transformers ---------------------------------------------------------------------------------------


def _copy_routed(ours: MoELayer, gate_weight: torch.Tensor, experts: torch.nn.Module) -> None:
    ours.router.gate.weight.copy_(gate_weight)
    ours.experts.gate_up_proj.copy_(experts.gate_up_proj.view_as(ours.experts.gate_up_proj))
    ours.experts.down_proj.copy_(experts.down_proj)


def _check_parity(
    ours: MoELayer, hf: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Forward, input gradient and the gradients of ``pairs`` (ours, theirs) agree in fp32."""
    x = torch.randn(3, 7, ours.experts.dim)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_hf = ours(x_ours), hf(x_hf)
    # fp32, the same math summed in another order: 1e-5 is ~100 ulp of outputs of magnitude ~1.
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_hf)
    y_ours.backward(grad)
    y_hf.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.grad.reshape(theirs.grad.shape), theirs.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isolate", [True, False])
def test_matches_transformers_deepseek_v3_moe(isolate: bool) -> None:
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    # N=4 experts of hidden 32, top-2, split in 2, 2 shared experts:
    # isolated -> 6 routed (hidden 16), top-2; HF convention -> 8 routed, top-4. 2 groups, 1 kept, scale 2.5.
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_hidden=32,
        score_func="sigmoid",
        n_groups=2,
        topk_groups=1,
        route_scale=2.5,
        bias_update_rate=0.001,
        experts_impl="loop",
        shared_experts=2,
    )
    settings = DeepSeekMoEConfig(segments=2, isolate_shared=isolate)
    ours = DeepSeekMoELayer(24, moe, settings)
    shape = ours.shape
    hf = DeepseekV3MoE(
        DeepseekV3Config(
            hidden_size=24,
            moe_intermediate_size=shape.expert_hidden,
            n_routed_experts=shape.routed_experts,
            num_experts_per_tok=shape.routed_top_k,
            n_shared_experts=2,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            experts_implementation="eager",
        )
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        # A positive correction bias: every biased sigmoid score is then positive, so a group mask of 0.0 (an older
        # HF copy) and of -inf (ours, and this HF version) select the same experts.
        hf.gate.e_score_correction_bias.uniform_(0.0, 0.2)
        _copy_routed(ours, hf.gate.weight, hf.experts)
        ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(getattr(hf.shared_experts, name).weight)

    # The group limit matters for these inputs: without it some tokens would pick other experts.
    x_TD = torch.randn(21, 24)
    with torch.no_grad():
        limited = ours.router(x_TD).topk_ids_TK.sort(-1).values
        free = TopKRouter(24, shape.routed_experts, shape.routed_top_k, "sigmoid", use_expert_bias=True)
        free.gate.weight.copy_(ours.router.gate.weight)
        free.expert_bias.copy_(ours.router.expert_bias)
        assert not torch.equal(limited, free(x_TD).topk_ids_TK.sort(-1).values)
        _, _, hf_ids = hf.gate(x_TD)
        assert torch.equal(limited, hf_ids.sort(-1).values)

    pairs = [
        (ours.router.gate.weight, hf.gate.weight),
        (ours.experts.gate_up_proj, hf.experts.gate_up_proj),
        (ours.experts.down_proj, hf.experts.down_proj),
        *[
            (getattr(ours.shared_experts, n).weight, getattr(hf.shared_experts, n).weight)
            for n in ("gate_proj", "up_proj", "down_proj")
        ],
    ]
    _check_parity(ours, hf, pairs)


def test_core_layer_with_shared_experts_matches_transformers_qwen2_moe_block() -> None:
    """Qwen2-MoE needs no plugin: the core MoELayer with moe.shared_experts / shared_expert_hidden / the gate."""
    pytest.importorskip("transformers")
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    # Qwen2-MoE: softmax without renormalisation, one shared expert of its own size behind a sigmoid gate.
    moe = MoEConfig(
        num_experts=6,
        top_k=2,
        expert_hidden=20,
        route_norm=False,
        experts_impl="loop",
        shared_experts=1,
        shared_expert_hidden=40,
        shared_expert_gate=True,
    )
    ours = MoELayer(24, moe)
    hf = Qwen2MoeSparseMoeBlock(
        Qwen2MoeConfig(
            hidden_size=24,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            experts_implementation="eager",
        )
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        _copy_routed(ours, hf.gate.weight, hf.experts)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(getattr(hf.shared_expert, name).weight)
        ours.shared_experts.gate.weight.copy_(hf.shared_expert_gate.weight)
    pairs = [
        (ours.router.gate.weight, hf.gate.weight),
        (ours.experts.gate_up_proj, hf.experts.gate_up_proj),
        (ours.shared_experts.up_proj.weight, hf.shared_expert.up_proj.weight),
        (ours.shared_experts.gate.weight, hf.shared_expert_gate.weight),
    ]
    _check_parity(ours, hf, pairs)
