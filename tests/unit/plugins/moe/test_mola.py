"""MoLA: the adapted projection's math, the allocations, the hooks as the trainer calls them, bad configs.

Tolerances (fp32): the batched all-experts contraction sums in another order than the per-token loop of the
formula, so outputs and gradients agree to round-off, ~1e-6 relative; we allow 1e-5. bf16 autocast keeps 8 bits
of mantissa (relative error ~4e-3 per op): 3e-2 there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from framework.config import ConfigError, JobConfig, resolve, section_docs
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from plugins.moe import mola
from plugins.moe.mola import MoLALinear, expert_allocation, layer_groups, mola_modules, switch_balance_loss
from plugins.peft.low_rank import experts_from_peft
from tests.unit.plugins.tiny_jobs import MOE_JOB_4_LAYERS

TOL = {"atol": 1e-5, "rtol": 1e-5}
REPO = Path(__file__).resolve().parents[4]
SMALL = MOE_JOB_4_LAYERS


def _manager() -> PluginManager:
    pm = PluginManager(default_registry())
    pm.register_object("mola", mola)
    return pm


def _config(pm: PluginManager, mola_section: dict[str, Any] | None = None, **sections: Any) -> JobConfig:
    raw: dict[str, Any] = {"plugins": ["mola"], **{k: dict(v) for k, v in SMALL.items()}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    raw["mola"] = mola_section or {}
    return resolve(raw, pm.config_sections)


def _model(config: JobConfig, pm: PluginManager) -> Transformer:
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    return model


def _trained_projection(num_experts: int = 5, top_k: int = 2, bias: bool = True) -> MoLALinear:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 9, bias=bias)
    layer = MoLALinear(base, num_experts, top_k, r=3, alpha=6.0, dropout=0.0)
    layer.reset_adapters("kaiming", g)
    with torch.no_grad():  # B as if trained, and a router that spreads tokens
        layer.lora_B.normal_(0.0, 0.5, generator=g)
        layer.router.weight.normal_(0.0, 1.0, generator=g)
    return layer


def _formula(layer: MoLALinear, x: torch.Tensor) -> torch.Tensor:
    """y = Wx + b + Σ_{i∈top-k} w_i·B_i·A_i·x·α/r, token by token."""
    rows = []
    for x_d in x.reshape(-1, layer.in_features):
        probs = torch.softmax(layer.router.weight.float() @ x_d.float(), dim=-1)
        top, ids = probs.topk(layer.top_k)
        weights = top / top.sum()
        y = layer.weight @ x_d + (layer.bias if layer.bias is not None else 0)
        for w, i in zip(weights, ids.tolist()):
            y = y + w * layer.scaling * (layer.lora_B[i] @ (layer.lora_A[i] @ x_d))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], layer.out_features)


# --- the adapted projection ---------------------------------------------------------------------------------------


def test_forward_and_gradients_equal_the_formula() -> None:
    layer = _trained_projection()
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    params = [layer.lora_A, layer.lora_B, layer.router.weight]
    y = layer(x)
    torch.testing.assert_close(y, _formula(layer, x), **TOL)
    # Gradients too: zero gates for unselected experts give exactly the gradients of the sparse computation.
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((y * probe).sum(), params)
    ref_grads = torch.autograd.grad((_formula(layer, x) * probe).sum(), params)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL)


def test_unselected_experts_get_exactly_zero_gradient() -> None:
    layer = _trained_projection(num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([5.0, 1.0, -5.0, -5.0])  # x[0] > 0 picks expert 0 or 1 only
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(3)).abs()
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.lora_B.grad[2:]) == 0 and torch.count_nonzero(layer.lora_A.grad[2:]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[0]) > 0


def test_counts_are_exact_and_once_per_token_with_activation_checkpointing() -> None:
    pm = _manager()
    config = _config(pm, {"dropout": 0.0})
    model = _model(config, pm)
    pm.hook.expertrain_transform_model(model=model, config=config)
    model.enable_activation_checkpointing()
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids).sum().backward()  # backward recomputes every block: not counted again
    metrics = pm.merge_metrics(1, model, config)
    for path, m in mola_modules(model):
        counts = [metrics[f"mola/layer{m.layer_id}.{m.proj}/tokens_e{j}"] for j in range(m.num_experts)]
        assert sum(counts) == 2 * 16 * 2, path  # B·S tokens, top-2
    assert metrics["mola/max_over_mean"] >= 1.0
    # Consumed: the next call reports zeros; eval-mode forwards are not counted.
    model.eval()
    with torch.no_grad():
        model(ids)
    again = pm.merge_metrics(2, model, config)
    assert all(v == 0 for k, v in again.items() if "/tokens_e" in k)


def test_counts_equal_bincount_and_trace_without_a_graph_break() -> None:
    """MoLA counts its routed (token, expert) pairs by a scatter-add into N bins: the same integers as ``bincount``
    (so the same Switch balance loss, bit for bit), with a fixed output shape, so the counting and the balance loss
    trace under torch.compile as one graph (``bincount``'s data-dependent size broke it)."""
    import torch._dynamo

    torch.manual_seed(0)
    layer = MoLALinear(nn.Linear(8, 6), num_experts=4, top_k=2, r=2, alpha=4.0)
    layer.track_balance = True
    layer.train()
    x = torch.randn(3, 5, 8)
    layer(x)
    layer(x)
    _, ids_TK, probs_TN = layer.route(x.reshape(-1, 8))
    bincount_N = torch.bincount(ids_TK.flatten(), minlength=4)
    assert torch.equal(layer.consume_counts(), 2 * bincount_N)
    reference = 4 * (bincount_N.float() / ids_TK.numel() * probs_TN.mean(dim=0)).sum()
    assert torch.equal(layer.pop_balance_loss(), reference)
    torch._dynamo.reset()
    for explanation in (
        torch._dynamo.explain(layer._record)(ids_TK, probs_TN),
        torch._dynamo.explain(switch_balance_loss)(probs_TN, ids_TK),
    ):
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_bf16_autocast_stays_close_to_fp32() -> None:
    layer = _trained_projection()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=3e-2, rtol=3e-2)


# --- the plugin on a whole model ----------------------------------------------------------------------------------


def test_zero_delta_at_init_leaves_the_model_output_unchanged() -> None:
    pm = _manager()
    config = _config(pm)  # default dropout 0.05: B = 0 makes the delta exactly 0 anyway
    model = _model(config, pm)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    before = model(ids).detach()
    pm.hook.expertrain_transform_model(model=model, config=config)
    after = model(ids).detach()
    assert torch.equal(before, after)


def test_targets_layers_and_trainable_set() -> None:
    pm = _manager()
    config = _config(pm, {"allocation": "triangle", "base_experts": 4, "top_k": 1})
    model = _model(config, pm)
    base_names = {n for n, _ in model.named_parameters()}
    q_weight = model.layers[0].attention.q_proj.weight
    pm.hook.expertrain_transform_model(model=model, config=config)
    assert model.layers[0].attention.q_proj.weight is q_weight  # the base Parameter itself, not a copy
    adapted = {path: m for path, m in mola_modules(model)}
    # Attention in every layer; gate/up/down only in the dense layers 1 and 3 (routed experts are not adapted).
    for layer in range(4):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"layers.{layer}.attention.{proj}" in adapted
    for layer in (1, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"layers.{layer}.ffn.{proj}" in adapted
    assert len(adapted) == 4 * 4 + 2 * 3
    assert [adapted[f"layers.{i}.attention.q_proj"].num_experts for i in range(4)] == [4, 3, 2, 1]
    # Base parameter names are unchanged (checkpoints of the base still fit), the adapters are new names.
    names = {n for n, _ in model.named_parameters()}
    assert base_names <= names
    trainable = pm.trainable_names(model, config)
    assert trainable == names - base_names
    assert all(n.endswith(("router.weight", "lora_A", "lora_B")) for n in trainable)


def test_balance_loss_is_per_layer_and_off_by_default() -> None:
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_balance_loss(probs, ids).item() == pytest.approx(1.0)  # perfect balance
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    ids0 = torch.tensor([[0, 1]] * 8)
    # N·Σ f_i·P_i = 4·(0.5·0.7 + 0.5·0.1)
    assert switch_balance_loss(skewed, ids0).item() == pytest.approx(4 * (0.5 * 0.7 + 0.5 * 0.1))

    pm = _manager()
    ids_in = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    off = _config(pm)
    model = _model(off, pm)
    pm.hook.expertrain_transform_model(model=model, config=off)
    logits = model(ids_in)
    assert pm.merge_extra_losses(model, ids_in, logits, off) == {}

    pm = _manager()
    on = _config(pm, {"aux_loss_coef": 1e-3})
    model = _model(on, pm)
    pm.hook.expertrain_transform_model(model=model, config=on)
    logits = model(ids_in)
    # By hand from the modules' own routers: mean over a layer's projections, summed over layers.
    per_layer: dict[int, list[torch.Tensor]] = {}
    hidden: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, p=path: hidden.__setitem__(p, args[0]))
        for path, m in mola_modules(model)
    ]
    model(ids_in)
    for h in hooks:
        h.remove()
    for path, m in mola_modules(model):
        _, top_ids, probs = m.route(hidden[path].reshape(-1, m.in_features))
        per_layer.setdefault(m.layer_id, []).append(switch_balance_loss(probs, top_ids))
    expected = 1e-3 * sum(torch.stack(v).mean() for v in per_layer.values())
    losses = pm.merge_extra_losses(model, ids_in, logits, on)
    assert list(losses) == ["mola_balance"]
    torch.testing.assert_close(losses["mola_balance"].detach(), expected.detach(), **TOL)
    assert losses["mola_balance"].requires_grad  # it trains the routers
    assert pm.merge_extra_losses(model, ids_in, logits, on) == {}  # popped


# --- allocations --------------------------------------------------------------------------------------------------


def test_allocations_for_4_8_and_32_layers() -> None:
    assert expert_allocation("triangle", 8, 4) == [8, 6, 4, 2]
    assert expert_allocation("inverted_triangle", 8, 4) == [2, 4, 6, 8]
    assert expert_allocation("hourglass", 8, 4) == [8, 2, 2, 8]
    assert expert_allocation("uniform", 5, 4) == [5, 5, 5, 5]  # the paper's MoLA-□ 5-5-5-5
    assert expert_allocation("triangle", 8, 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    assert expert_allocation("inverted_triangle", 8, 8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert expert_allocation("hourglass", 8, 8) == [8, 8, 2, 2, 2, 2, 8, 8]
    # The reference README's 32-layer LLaMA list for 2-4-6-8.
    assert expert_allocation("inverted_triangle", 8, 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    # Uneven depths: the lower groups take the extra layers; fewer than 4 layers use the lowest groups.
    assert layer_groups(6) == [0, 0, 1, 1, 2, 3]
    assert expert_allocation("inverted_triangle", 8, 2) == [2, 4]
    assert expert_allocation("triangle", 2, 4) == [2, 2, 1, 1]  # at least one expert (0.5 rounds up to 1)


# --- bad configs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mola_section, sections, key",
    [
        ({"experts": [2, 2, 2]}, {}, "mola.experts"),
        ({"experts": [2, 0, 2, 2]}, {}, r"mola.experts\[1\]"),
        ({"experts": [4, 4, 1, 4]}, {}, "mola.top_k"),
        ({"allocation": "triangle", "base_experts": 4, "top_k": 2}, {}, "mola.top_k"),  # 4-3-2-1
        ({"targets": ["q_proj", "wq"]}, {}, r"mola.targets\[1\]"),
        ({"targets": []}, {}, "mola.targets"),
        ({"targets": ["q_proj", "q_proj"]}, {}, "mola.targets"),
        ({"dropout": 1.0}, {}, "mola.dropout"),
        ({}, {"parallel": {"tp": 2}}, "parallel.tp"),
    ],
)
def test_bad_configs_name_the_key(mola_section: dict[str, Any], sections: dict[str, Any], key: str) -> None:
    pm = _manager()
    config = _config(pm, mola_section, **sections)
    with pytest.raises(ConfigError, match=key):
        pm.hook.expertrain_validate_config(config=config, world_size=2)


@pytest.mark.parametrize(
    "mola_section, key",
    [({"r": 0}, "mola.r"), ({"top_k": 0}, "mola.top_k"), ({"allocation": "diamond"}, "mola.allocation")],
)
def test_out_of_range_values_are_refused_when_typed(mola_section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _config(_manager(), mola_section)


def test_targets_that_match_nothing_are_refused() -> None:
    pm = _manager()
    # Every layer MoE: gate/up/down_proj exist only as fused routed experts, which MoLA does not adapt.
    config = _config(pm, {"targets": ["gate_proj", "down_proj"]}, moe={"every": 1})
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    with pytest.raises(ConfigError, match="mola.targets.*none matched"):
        pm.hook.expertrain_transform_model(model=_model(config, pm), config=config)


# --- export -------------------------------------------------------------------------------------------------------


def test_export_writes_peft_like_keys_that_round_trip(tmp_path: Path) -> None:
    """With the head and final norm trained in full (mola.modules_to_save): in the export under our names."""
    pm = _manager()
    config = _config(pm, {"targets": ["q_proj", "down_proj"], "modules_to_save": ["lm_head", "norm"]})
    model = _model(config, pm)
    pm.hook.expertrain_transform_model(model=model, config=config)
    assert {"output.weight", "norm.weight"} <= pm.trainable_names(model, config)
    with torch.no_grad():
        for _, m in mola_modules(model):
            m.lora_B.normal_()
        model.output.weight.mul_(2.0)  # as training the head would move it
    assert (
        pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="native")
        == []
    )
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="mola")
    assert files == [["adapter_model.safetensors", "adapter_config.json"]]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    modules = dict(mola_modules(model))
    assert len(tensors) == 3 * len(modules) + 2
    assert torch.equal(tensors["base_model.model.output.weight"], model.output.weight.detach())
    assert torch.equal(tensors["base_model.model.norm.weight"], model.norm.weight.detach())
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == ["norm", "output"] and meta["tied_embeddings"] is False
    q0 = modules["layers.0.attention.q_proj"]
    prefix = "base_model.model.layers.0.attention.q_proj"
    assert tensors[f"{prefix}.lora_A.weight"].shape == (q0.num_experts * 8, 32)
    assert tensors[f"{prefix}.lora_B.weight"].shape == (32, 8 * q0.num_experts)
    assert tensors[f"{prefix}.router.weight"].shape == (q0.num_experts, 32)
    for path, m in modules.items():
        key = f"base_model.model.{path}"
        A, B = experts_from_peft(
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], m.num_experts
        )
        assert torch.equal(A, m.lora_A.detach()) and torch.equal(B, m.lora_B.detach())
        assert torch.equal(tensors[f"{key}.router.weight"], m.router.weight.detach())


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (REPO / "docs" / "plugins" / "mola.md").read_text(encoding="utf-8")
    for field, typ, default, meaning in section_docs(mola.MoLAConfig):
        shown = (
            f"`{default!r}`" if default in ("", []) else f"`{default}`"
        )  # as docs/config.md shows defaults
        row = f"| `mola.{field}` | {typ} | {shown} | {meaning} |"
        assert row in doc, f"docs/plugins/mola.md is stale for mola.{field}: expected the row\n{row}"


def test_adapters_on_shared_expert_projections_take_part_in_the_forward() -> None:
    """MoLA adapts the nn.Linear projections of deepseek_moe's shared experts: their update reaches the output and
    their adapters get gradients (the shared experts call the wrapped projections)."""
    from plugins.moe.deepseek_moe import DeepSeekMoEPlugin

    pm = _manager()
    pm.register_object("deepseek_moe", DeepSeekMoEPlugin())
    raw: dict[str, Any] = {"plugins": ["deepseek_moe", "mola"], **{k: dict(v) for k, v in SMALL.items()}}
    raw["moe"] = {**raw["moe"], "block": "deepseek_moe", "shared_experts": 1}
    raw["mola"] = {"dropout": 0.0}
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = _model(config, pm)
    pm.hook.expertrain_transform_model(model=model, config=config)
    shared = {p: m for p, m in mola_modules(model) if ".shared_experts." in p}
    assert set(shared) == {
        f"layers.{i}.ffn.shared_experts.{n}" for i in (0, 2) for n in ("gate_proj", "up_proj", "down_proj")
    }
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    before = model(ids).detach()
    with torch.no_grad():
        for m in shared.values():
            m.lora_B.normal_(0, 0.5)
    after = model(ids)
    assert (after - before).abs().max() > 1e-3
    after.float().pow(2).mean().backward()
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in shared.values())
