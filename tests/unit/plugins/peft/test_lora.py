"""The lora plugin: target selection and coverage, the adapted modules' math, merge/unmerge, the frozen base under a
real optimizer step, conflicts with another adapter plugin, bad configs, and the peft export against real peft.

Tolerances (fp32, activations of order 1): a delta computed as ``(x A^T) B^T`` vs one merged into ``W`` sums in
another order, ~1e-6 relative: we allow 1e-5. Unmerge subtracts exactly what merge added, so the weights come back
to within one rounding of the weight values (~1e-7 here): we require <= 1e-6 (the issue's bound).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from framework.config import ConfigError, JobConfig, resolve, section_docs
from framework.config.sections import OptimConfig
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from framework.models.moe.experts import GroupedExperts
from framework.train.optim import build_optimizer
from plugins.moe import mola
from plugins.peft import lora
from plugins.peft.low_rank import LoRAExperts, LoRALinear, experts_from_peft, hf_module_path
from plugins.peft.targets import format_coverage, pattern_value, select_targets
from tests.unit.plugins.tiny_jobs import MOE_JOB

TOL = {"atol": 1e-5, "rtol": 1e-5}
REPO = Path(__file__).resolve().parents[4]
SMALL = MOE_JOB
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _manager(*names: str) -> PluginManager:
    pm = PluginManager(default_registry())
    for name in names or ("lora",):
        pm.register_object(name, {"lora": lora, "mola": mola}[name])
    return pm


def _config(pm: PluginManager, section: dict[str, Any] | None = None, **sections: Any) -> JobConfig:
    raw: dict[str, Any] = {"plugins": ["lora"], **{k: dict(v) for k, v in SMALL.items()}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    raw["lora"] = section or {}
    return resolve(raw, pm.config_sections)


def _model(config: JobConfig, pm: PluginManager) -> Transformer:
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    return model


def _adapted(section: dict[str, Any], **sections: Any) -> tuple[Transformer, JobConfig, PluginManager]:
    pm = _manager()
    config = _config(pm, section, **sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = _model(config, pm)
    pm.hook.expertrain_transform_model(model=model, config=config)
    return model, config, pm


def _train_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every B (and A) non-zero values, as training would, so deltas are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            for lora_mod in [m.lora] if isinstance(m, LoRALinear) else m.adapters().values():
                lora_mod.lora_B.copy_(torch.randn(lora_mod.lora_B.shape, generator=g) * 0.3)


# --- target selection ---------------------------------------------------------------------------------------------


def test_suffix_regex_and_all_linear_selection() -> None:
    pm = _manager()
    model = _model(_config(pm), pm)
    paths = lambda spec, experts=False: [p for p, _ in select_targets(model, spec, experts).linears]  # noqa: E731
    assert paths(["q_proj", "ffn.down_proj"]) == [
        "layers.0.attention.q_proj",
        "layers.1.attention.q_proj",
        "layers.1.ffn.down_proj",  # the dense layer only: the MoE layer's experts are fused weights
    ]
    assert paths(r"layers\.1\.attention\.[qv]_proj") == [
        "layers.1.attention.q_proj",
        "layers.1.attention.v_proj",
    ]
    everything = paths("all-linear")
    assert len(everything) == 2 * 4 + 3  # attention in both layers, the dense MLP; not the LM head
    assert "output" not in everything and not any("router" in p for p in everything)
    assert paths(["output"]) == ["output"]  # the LM head only when named
    experts = select_targets(model, [], target_experts=True).experts
    assert [p for p, _ in experts] == ["layers.0.ffn.experts"]


@pytest.mark.parametrize(
    "spec, experts, key, pattern",
    [
        (["q_proj", "wq"], False, r"lora.targets\[1\]", "'wq'"),
        (r"layers\.9\..*", False, "lora.targets", r"layers\\\\.9"),
        (["router.gate"], False, r"lora.targets\[0\]", "routers, shared experts"),
        ([], False, "lora.targets", "suffixes"),
    ],
)
def test_a_target_that_matches_nothing_is_named(spec: Any, experts: bool, key: str, pattern: str) -> None:
    pm = _manager()
    model = _model(_config(pm), pm)
    with pytest.raises(ConfigError, match=f"{key}.*{pattern}"):
        select_targets(model, spec, experts)


def test_target_experts_on_a_dense_model_is_refused() -> None:
    pm = _manager()
    model = _model(_config(pm, moe={"num_experts": 0}), pm)
    with pytest.raises(ConfigError, match="lora.target_experts"):
        select_targets(model, ["q_proj"], target_experts=True)


def test_rank_and_alpha_patterns_follow_peft() -> None:
    patterns = {"v_proj": 2, r"layers\.1\..*": 6}
    assert pattern_value(patterns, "layers.0.attention.v_proj", 8) == 2  # suffix
    assert pattern_value(patterns, "layers.1.attention.q_proj", 8) == 6  # regex on the whole path
    assert pattern_value(patterns, "layers.0.attention.q_proj", 8) == 8
    assert pattern_value(patterns, "layers.1.attention.v_proj", 8) == 2  # first matching key wins
    assert pattern_value({"proj": 3}, "layers.0.attention.q_proj", 8) == 8  # a suffix is a whole name part


# --- the transform as the trainer calls it ------------------------------------------------------------------------


def test_transform_coverage_trainable_set_and_zero_delta(capsys: pytest.CaptureFixture) -> None:
    pm = _manager()
    section = {
        "targets": ["q_proj", "v_proj", "down_proj"],
        "target_experts": True,
        "rank_pattern": {"v_proj": 2},
    }
    config = _config(pm, section)
    model = _model(config, pm)
    base_names = {n for n, _ in model.named_parameters()}
    q_weight = model.layers[0].attention.q_proj.weight
    before = model(IDS).detach()
    pm.hook.expertrain_transform_model(model=model, config=config)
    assert torch.equal(model(IDS).detach(), before)  # B = 0: the adapted model is the base model
    assert model.layers[0].attention.q_proj.weight is q_weight  # the base Parameter itself, names unchanged
    assert model.layers[0].attention.v_proj.lora.r == 2 and model.layers[0].attention.q_proj.lora.r == 8
    assert isinstance(model.layers[0].ffn.experts, LoRAExperts)

    names = {n for n, _ in model.named_parameters()}
    trainable = pm.trainable_names(model, config)
    assert base_names <= names and trainable == names - base_names
    assert "layers.0.ffn.experts.lora_gate_up_proj.lora_A" in trainable
    # q, v in 2 layers (r 8 and 2), the dense down_proj (r 8), experts gate_up [4, 8, 32] + [4, 48, 8], down
    # [4, 8, 24] + [4, 32, 8].
    expected = 2 * (8 * 32 + 32 * 8) + 2 * (2 * 32 + 16 * 2) + (8 * 48 + 32 * 8) + 4 * 8 * (32 + 48 + 24 + 32)
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in trainable) == expected
    total = sum(p.numel() for p in model.parameters())
    line = capsys.readouterr().out
    assert "lora: adapted 5 linear modules (q_proj x2, v_proj x2, down_proj x1)" in line
    assert "the routed experts of 1 MoE layers (4 experts)" in line
    assert f"{expected:,} trainable parameters = {100 * expected / total:.2f}% of {total:,}" in line


def test_base_is_frozen_no_gradient_no_optimizer_state() -> None:
    model, config, pm = _adapted({"target_experts": True})
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    optimizer = build_optimizer(model, OptimConfig(), pm.param_groups(model, config), torch.device("cpu"))
    model(IDS).float().logsumexp(-1).mean().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    with_state = {n for n, p in params.items() if optimizer.state.get(p)}
    assert with_state == trainable and len(optimizer.state) == len(trainable)
    assert all(params[n].grad is None for n in params if n not in trainable)
    assert all(params[n].grad is not None for n in trainable)


# --- the adapted modules ------------------------------------------------------------------------------------------


def test_linear_forward_is_the_formula_and_merge_round_trips() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    layer = LoRALinear(base, r=4, alpha=6.0)
    layer.lora.reset_parameters("gaussian", torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora.lora_B.normal_(0, 0.5)
    x = torch.randn(3, 5, 12)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ layer.lora.lora_A.T @ layer.lora.lora_B.T)
    torch.testing.assert_close(layer(x), expected, **TOL)
    weight = layer.weight.detach().clone()
    unmerged = layer(x).detach()
    layer.merge()
    assert not torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer(x), unmerged, **TOL)
    layer.unmerge()
    assert (layer.weight - weight).abs().max().item() <= 1e-6


def test_experts_forward_equals_experts_with_merged_weights() -> None:
    model, config, _ = _adapted({"targets": [], "target_experts": True, "rank_pattern": {"down_proj": 3}})
    _train_adapters(model)
    experts: LoRAExperts = model.layers[0].ffn.experts
    assert experts.lora_down_proj.r == 3 and experts.lora_gate_up_proj.r == 8
    reference = GroupedExperts(4, 32, 24, impl="loop")
    with torch.no_grad():
        reference.gate_up_proj.copy_(
            experts.gate_up_proj + experts.lora_gate_up_proj.delta_weight().view(4, 2, 24, 32)
        )
        reference.down_proj.copy_(experts.down_proj + experts.lora_down_proj.delta_weight())
    x = torch.randn(20, 32)
    tokens = torch.tensor([6, 0, 9, 5])
    for impl in ("loop", "bmm", "grouped_mm"):
        experts.impl = impl
        torch.testing.assert_close(experts(x, tokens), reference(x, tokens), **TOL)


def test_merged_model_forward_equals_unmerged_and_unmerge_restores() -> None:
    model, _, _ = _adapted({"targets": "all-linear", "target_experts": True})
    _train_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    unmerged = model(IDS).detach()
    lora.set_merged(model, True)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert "layers.0.ffn.experts.gate_up_proj" in changed and "layers.1.attention.q_proj.weight" in changed
    torch.testing.assert_close(model(IDS).detach(), unmerged, **TOL)
    lora.set_merged(model, False)
    drift = max((p - weights[n]).abs().max().item() for n, p in model.named_parameters())
    assert drift <= 1e-6


def test_two_adapter_plugins_on_one_module_are_refused() -> None:
    for order in (("lora", "mola"), ("mola", "lora")):
        pm = _manager(*order)
        raw: dict[str, Any] = {"plugins": list(order), **{k: dict(v) for k, v in SMALL.items()}}
        raw["lora"] = {"targets": ["q_proj"]}
        raw["mola"] = {"targets": ["q_proj"], "experts": [2, 2]}
        config = resolve(raw, pm.config_sections)
        model = _model(config, pm)
        first, second = order
        with pytest.raises(
            ConfigError, match=f"'{first}' and '{second}' both adapt layers.0.attention.q_proj"
        ):
            pm.hook.expertrain_transform_model(model=model, config=config)


@pytest.mark.parametrize(
    "section, key",
    [
        ({"dropout": 0.1, "target_experts": True}, "lora.dropout"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"rank_pattern": {"q_proj": 0}}, "lora.rank_pattern.q_proj"),
        ({"rank_pattern": {"q_proj": 2.5}}, "lora.rank_pattern.q_proj"),
        ({"alpha_pattern": {"(": 4}}, re.escape("lora.alpha_pattern.(")),
        ({"targets": []}, "lora.targets"),
    ],
)
def test_bad_configs_name_the_key(section: dict[str, Any], key: str) -> None:
    pm = _manager()
    with pytest.raises(ConfigError, match=key):
        pm.hook.expertrain_validate_config(config=_config(pm, section), world_size=1)


def test_coverage_formatting_without_linears() -> None:
    model, _, _ = _adapted({"targets": [], "target_experts": True})
    targets = select_targets(model, [], target_experts=True)
    line = format_coverage("lora", model, targets, 10, "r=8")
    assert line.startswith("lora: adapted the routed experts of 1 MoE layers (4 experts); r=8; 10 trainable")


# --- export -------------------------------------------------------------------------------------------------------


def test_hf_module_paths() -> None:
    assert hf_module_path("tok_embeddings") == "model.embed_tokens"
    assert hf_module_path("layers.3.attention.o_proj") == "model.layers.3.self_attn.o_proj"
    assert hf_module_path("layers.1.ffn.gate_proj") == "model.layers.1.mlp.gate_proj"
    assert hf_module_path("layers.0.ffn.experts") == "model.layers.0.mlp.experts"
    assert hf_module_path("layers.0.ffn.router.gate") == "model.layers.0.mlp.gate"
    assert hf_module_path("output") == "lm_head"
    with pytest.raises(ValueError, match="no transformers name"):
        hf_module_path("blocks.0.wq")


def _export(model: nn.Module, config: JobConfig, pm: PluginManager, out: Path) -> tuple[dict, dict]:
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=out, export_format="peft")
    assert files == [["adapter_model.safetensors", "adapter_config.json"]]
    return load_file(str(out / "adapter_model.safetensors")), json.loads(
        (out / "adapter_config.json").read_text()
    )


def _peft_save(hf_model: nn.Module, out: Path, **lora_kwargs: Any) -> tuple[dict, dict]:
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    peft_model.save_pretrained(str(out))
    return load_file(str(out / "adapter_model.safetensors")), json.loads(
        (out / "adapter_config.json").read_text()
    )


FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "peft_type",
    "task_type",
    "bias",
    "init_lora_weights",
)


def _peft_reproduces(
    model: nn.Module, config: JobConfig, pm: PluginManager, adapter: Path, tmp: Path
) -> None:
    """Independent reference: real peft applies our exported adapter to the Hugging Face form of the same base
    weights (a fresh build with the same init seed, written by ``save_pretrained``); its logits equal our adapted
    model's to fp32 round-off (atol 1e-5 on logits of ~1: the same sums in another order). The adapters must move the
    logits by more than 1e-3 for the check to see them."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from framework.interop.hf import save_pretrained

    save_pretrained(_model(config, pm), tmp / "base")
    with torch.no_grad():
        expected = model(IDS)
        hf = AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
        before = hf(IDS).logits
        got = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()(IDS).logits
    assert (expected - before).abs().max() > 1e-3, "the adapters must move the model for this to test them"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0.0)


def test_export_matches_peft_on_llama_and_peft_reproduces_the_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    section = {"targets": ["q_proj", "v_proj", "o_proj", "gate_proj"], "r": 4, "alpha": 8.0}
    section["rank_pattern"] = {"v_proj": 2}
    model, config, pm = _adapted(section, moe={"num_experts": 0})
    _train_adapters(model)
    ours, our_cfg = _export(model, config, pm, tmp_path / "ours")
    _peft_reproduces(model, config, pm, tmp_path / "ours", tmp_path)
    m = config.model
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_hidden, num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        )
    )  # fmt: skip
    theirs, their_cfg = _peft_save(
        hf,
        tmp_path / "peft",
        r=4,
        lora_alpha=8,
        target_modules=section["targets"],
        rank_pattern={"v_proj": 2},
    )
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name in FIELDS:
        assert our_cfg[name] == their_cfg[name], name
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    # Patterns are written resolved (one key per module whose rank differs) and resolve like peft's own.
    for key in ours:
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        assert pattern_value(our_cfg["rank_pattern"], module, 4) == pattern_value(
            their_cfg["rank_pattern"], module, 4
        )


def test_export_matches_peft_on_mixtral_experts_and_peft_reproduces_the_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    section = {"targets": ["q_proj", "k_proj"], "target_experts": True, "r": 2, "alpha": 4.0}
    model, config, pm = _adapted(section, moe={"every": 1})  # both layers MoE
    _train_adapters(model)
    ours, our_cfg = _export(model, config, pm, tmp_path / "ours")
    _peft_reproduces(model, config, pm, tmp_path / "ours", tmp_path)
    m, moe = config.model, config.moe
    hf = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=moe.expert_hidden,
            num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
            num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        )
    )  # fmt: skip
    theirs, their_cfg = _peft_save(
        hf,
        tmp_path / "peft",
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "k_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for name in FIELDS:
        assert our_cfg[name] == their_cfg[name], name
    for name in ("target_modules", "target_parameters"):  # peft writes a set: any order
        assert sorted(our_cfg[name]) == sorted(their_cfg[name]), name
    # The expert tensors round-trip to our per-expert adapters (gate_up is peft's inner wrapper: base_layer).
    experts: LoRAExperts = model.layers[1].ffn.experts
    for name, prefix in (("gate_up_proj", ".base_layer"), ("down_proj", "")):
        key = f"base_model.model.model.layers.1.mlp.experts{prefix}"
        A, B = experts_from_peft(ours[f"{key}.lora_A.weight"], ours[f"{key}.lora_B.weight"], 4)
        adapter = experts.adapters()[name]
        assert torch.equal(A, adapter.lora_A.detach()) and torch.equal(B, adapter.lora_B.detach())


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (REPO / "docs" / "plugins" / "lora.md").read_text(encoding="utf-8")
    for field, typ, default, meaning in section_docs(lora.LoRAConfig):
        shown = (
            f"`{default!r}`" if default in ("", [], {}) else f"`{default}`"
        )  # as docs/config.md shows defaults
        row = f"| `lora.{field}` | {typ} | {shown} | {meaning} |"
        assert row in doc, f"docs/plugins/lora.md is stale for lora.{field}: expected the row\n{row}"
