"""The compacter plugin: the PHM weight ``Σ A_i ⊗ s_i t_iᵀ`` against ``torch.kron``, one set of rules shared by every
adapter, the trainable parameter count against the paper's formula for several n, d, k and both variants, the
adapter placement and forward formula, the near-identity output at init, the frozen base, the optimizer groups, bad
configs (tensor parallelism is accepted), and the export (its own format; peft refused; not mergeable).

Tolerances (fp32): the einsum Kronecker sum vs ``torch.kron`` reorders nothing but the summation over i: 1e-6.
Forward formula (same ops, different grouping): 1e-6. Output at init: the shared rules are N(0, 1e-4²), so each
PHM weight is ~1e-4 of a Glorot matrix and the adapter adds ~1e-7 of its input (measured 1.8e-7 on inputs of
order 1: bound 1e-6); logits (order 1) of the adapted and the base model must agree to 1e-5 (measured 9e-8).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from framework.config import ConfigError, JobConfig, resolve, section_docs
from framework.hooks import PluginError, PluginManager
from framework.models import Transformer, default_registry
from framework.train.optim import build_optimizer
from plugins.peft import compacter
from plugins.peft.compacter import PHMLinear, SharedRules

REPO = Path(__file__).resolve().parents[4]
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _raw(dim: int = 32, n_layers: int = 2, **section: Any) -> dict[str, Any]:
    return {
        "plugins": ["compacter"],
        "model": {
            "dim": dim,
            "n_layers": n_layers,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_hidden": 48,
            "max_seq_len": 16,
            "vocab_size": 64,
        },
        "moe": {"num_experts": 4, "expert_hidden": 24, "every": 2},
        "data": {"seq_len": 16},
        "compacter": {"reduction_factor": 4, **section},
    }


def _job(raw: dict[str, Any]) -> tuple[Transformer, Transformer, JobConfig, PluginManager]:
    """(adapted model, the same base without adapters, config, plugin manager)."""
    pm = PluginManager(default_registry())
    pm.register_object("compacter", compacter)
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    base = Transformer(config.model, config.moe, pm.registry)
    base.init_weights(0)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)
    return model, base, config, pm


def test_phm_weight_is_the_sum_of_kronecker_products() -> None:
    g = torch.Generator().manual_seed(0)
    rules = SharedRules(4)
    rules.reset_parameters(1.0, g)
    layer = PHMLinear(12, 8, rules)
    layer.reset_parameters(g)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    expected = sum(torch.kron(rules.rules[i], torch.outer(layer.s[i], layer.t[i])) for i in range(4))
    assert layer.weight().shape == (8, 12)
    torch.testing.assert_close(layer.weight(), expected, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 12, generator=g)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="divisible by n=4"):
        PHMLinear(10, 8, rules)


@pytest.mark.parametrize(
    "n, dim, reduction, variant",
    [(2, 32, 4, "compacter"), (4, 64, 8, "compacter"), (8, 64, 8, "compacter++"), (4, 32, 4, "compacter++")],
)
def test_trainable_count_is_the_papers_formula(n: int, dim: int, reduction: int, variant: str) -> None:
    model, _, config, pm = _job(_raw(dim=dim, n_layers=3, n=n, reduction_factor=reduction, variant=variant))
    d, k, L = dim, dim // reduction, 3
    params = dict(model.named_parameters())
    adapters = compacter.adapter_parameter_names(model)
    weights = sum(params[a].numel() for a in adapters if not a.endswith(".bias"))
    biases = sum(params[a].numel() for a in adapters if a.endswith(".bias"))
    per_layer = 2 if variant == "compacter" else 1
    assert weights == n**3 + 2 * per_layer * L * (d + k)  # the paper: 4L(d + k) + n³ for Compacter
    assert biases == per_layer * L * (d + k)
    count = compacter.parameter_count(n, d, k, compacter.adapter_count(L, variant))
    assert weights + biases == count
    norms = sum(params[p].numel() for p in compacter.norm_parameter_names(model))
    assert norms == (2 * L + 1) * d
    trainable = pm.trainable_names(model, config)
    assert sum(params[t].numel() for t in trainable) == count + norms


def test_placement_and_shared_rules() -> None:
    model, _, _, _ = _job(_raw())
    paths = [p for p, _ in compacter.compacter_modules(model)]
    assert paths == [f"layers.{i}.{s}_adapter" for i in range(2) for s in ("attention", "ffn")]
    plus, _, _, _ = _job(_raw(variant="compacter++"))
    assert [p for p, _ in compacter.compacter_modules(plus)] == [
        "layers.0.ffn_adapter",
        "layers.1.ffn_adapter",
    ]
    rules = model.compacter_rules
    layers = [m for _, a in compacter.compacter_modules(model) for m in (a.down, a.up)]
    assert all(layer._rules is rules for layer in layers)
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("rules")) == 1
    model(IDS).logsumexp(-1).mean().backward()
    assert rules.rules.grad is not None and torch.count_nonzero(rules.rules.grad) > 0


def test_forward_adds_the_adapter_after_each_sublayer() -> None:
    model, _, _, _ = _job(_raw())
    block = model.layers[1]
    adapter = block.attention_adapter
    with torch.no_grad():  # make the adapter visible: rules of order 1
        model.compacter_rules.rules.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    cos, sin = model.rope_cos, model.rope_sin
    hooked = block.attention(x, cos, sin)
    with torch.no_grad():
        handles = list(block.attention._forward_hooks)
        plain = block.attention._forward_hooks.pop(handles[0])
        a = block.attention(x, cos, sin)
        block.attention._forward_hooks[handles[0]] = plain
    Wd, Wu = adapter.down.weight(), adapter.up.weight()
    expected = a + (F.gelu(a @ Wd.T + adapter.down.bias)) @ Wu.T + adapter.up.bias
    torch.testing.assert_close(hooked, expected, atol=1e-6, rtol=1e-6)
    assert (hooked - a).abs().max() > 1e-3  # the adapter did contribute


def test_output_at_init_is_the_base_model() -> None:
    model, base, _, _ = _job(_raw())
    with torch.no_grad():
        diff = (model(IDS) - base(IDS)).abs().max().item()
        a = torch.randn(4, 32)
        delta = (model.layers[0].ffn_adapter(a) - a).abs().max().item()
    assert diff < 1e-5
    assert 0 < delta < 1e-6  # near zero, not exactly: the reference's up-projection is not zero-initialised


def test_base_is_frozen_after_a_real_step() -> None:
    model, _, config, pm = _job(_raw())
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, config.optim, pm.param_groups(model, config), torch.device("cpu"))
    model(IDS).logsumexp(-1).mean().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if optimizer.state.get(p)} == trainable
    for n, p in params.items():
        assert torch.equal(p, before[n]) == (n not in trainable), n


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"n": 3}, "compacter.n"),
        ({"reduction_factor": 64}, "compacter.reduction_factor"),
    ],
)
def test_bad_configs_name_the_key(overrides: dict[str, Any], key: str) -> None:
    raw = _raw()
    raw["compacter"].update(overrides)
    pm = PluginManager(default_registry())
    pm.register_object("compacter", compacter)
    config = resolve(raw, pm.config_sections)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pm.hook.expertrain_validate_config(config=config, world_size=2)


def test_optimizer_groups_keep_the_core_decay_policy() -> None:
    raw = _raw()
    raw["optim"] = {"weight_decay": 0.1}
    model, _, config, pm = _job(raw)
    groups = {g["group_name"]: g for g in pm.param_groups(model, config)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["compacter_decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["compacter_no_decay"]["params"]}
    assert (
        groups["compacter_decay"]["weight_decay"] == 0.1
        and groups["compacter_no_decay"]["weight_decay"] == 0.0
    )
    assert decay | no_decay == set(
        compacter.adapter_parameter_names(model)
    )  # the norms stay in the core's groups
    assert "compacter_rules.rules" in decay and "layers.0.attention_adapter.down.s" in decay
    assert no_decay == {n for n in decay | no_decay if n.endswith(".bias")}


def test_export_writes_its_own_format_and_refuses_peft(tmp_path: Path) -> None:
    model, _, config, _ = _job(_raw())
    assert compacter.MERGEABLE is False
    files = compacter.expertrain_export(model, config, tmp_path, "compacter")
    assert files == ["adapter_model.safetensors", "adapter_config.json"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    assert "compacter_rules.rules" in tensors and "layers.1.ffn_adapter.up.s" in tensors
    assert "layers.0.attention_norm.weight" in tensors
    for name, t in tensors.items():
        assert torch.equal(t, params[name].detach()), name
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapter_type"] == "compacter" and meta["mergeable"] is False and meta["bottleneck"] == 8
    assert compacter.expertrain_export(model, config, tmp_path, "mola") is None
    with pytest.raises(PluginError, match="compacter adapters cannot be exported as peft"):
        compacter.expertrain_export(model, config, tmp_path, "peft")
    with pytest.raises(PluginError, match="compacter: .* cannot be merged"):
        compacter.expertrain_merge_adapters()


def test_export_reloaded_from_its_files_reproduces_the_model_bit_for_bit(tmp_path: Path) -> None:
    """The export applied again: a job built from ``adapter_config.json`` alone (base model and compacter settings)
    on the same base weights, with every tensor of ``adapter_model.safetensors`` loaded by name, computes the exported
    model's logits bit for bit (the same modules on the same values); before loading they differ by more than 1e-3.
    The LM head is trained in full (compacter.modules_to_save) and travels in the export too."""
    model, _, config, pm = _job(_raw(train_norms=True, modules_to_save=["lm_head"]))
    assert "output.weight" in pm.trainable_names(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every adapter tensor and norm as if trained
        for name in compacter.adapter_tensors(model, config):
            p = model.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="compacter")
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert adapter["modules_to_save"] == ["output"] and "output.weight" in tensors
    fields = [f.name for f in dataclasses.fields(compacter.CompacterConfig)]
    raw = {
        "plugins": ["compacter"],
        "model": adapter["base_model"]["model"],
        "moe": adapter["base_model"]["moe"],
        "data": {"seq_len": adapter["base_model"]["model"]["max_seq_len"]},
        "compacter": {f: adapter[f] for f in fields},
    }
    reloaded, _, _, _ = _job(raw)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = model(IDS)
        assert (reloaded(IDS) - expected).abs().max() > 1e-3
        params = dict(reloaded.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t)
        assert torch.equal(reloaded(IDS), expected)


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (REPO / "docs" / "plugins" / "compacter.md").read_text(encoding="utf-8")
    for field, typ, default, meaning in section_docs(compacter.CompacterConfig):
        row = f"| `compacter.{field}` | {typ} | `{default}` | {meaning} |"
        assert row in doc, (
            f"docs/plugins/compacter.md is stale for compacter.{field}: expected the row\n{row}"
        )
