"""``<plugin>.modules_to_save`` (plugins/peft/modules_to_save.py) through the lora plugin: which modules an entry
selects in either naming, the refusals, the trainable set after a real optimizer step, and the ``export peft``
adapter loaded by stock ``peft.PeftModel.from_pretrained`` on the transformers model of the base.

The base is our model written by ``save_pretrained`` (a Llama folder); the "trained" state is the adapters' ``B``
and the saved modules moved to random values. Tolerance of the logits (ours vs peft's on transformers): 1e-5
absolute, fp32, logits of order 1 (the same math summed in another order; docs/interop.md measures ~2e-6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from framework.config import ConfigError, JobConfig, resolve
from framework.config.sections import OptimConfig
from framework.hooks import PluginManager
from framework.interop.hf import save_pretrained
from framework.models import Transformer, default_registry
from framework.train.optim import build_optimizer
from plugins.peft import lora
from plugins.peft.low_rank import LoRALinear
from plugins.peft.modules_to_save import resolve as resolve_saved
from tests.unit.plugins.tiny_jobs import DENSE_JOB

DENSE = DENSE_JOB
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
LOGITS_TOL = {"atol": 1e-5, "rtol": 0.0}


def _adapted(
    section: dict[str, Any], tie: bool = False
) -> tuple[Transformer, JobConfig, PluginManager, Transformer]:
    """The lora-adapted model, its job and plugins, and a copy of the base taken before the transform."""
    pm = PluginManager(default_registry())
    pm.register_object("lora", lora)
    raw: dict[str, Any] = {"plugins": ["lora"], **{k: dict(v) for k, v in DENSE.items()}, "lora": section}
    raw["model"]["tie_embeddings"] = tie
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    base = Transformer(config.model, config.moe, pm.registry)
    base.load_state_dict(model.state_dict())
    pm.hook.expertrain_transform_model(model=model, config=config)
    return model, config, pm, base


def _saved_paths(section: dict[str, Any]) -> list[str]:
    model, config, _, _ = _adapted(section)
    return [s.path for s in resolve_saved(model, config.lora.modules_to_save, "lora")]


# --- selection ----------------------------------------------------------------------------------------------------


def test_peft_and_our_names_select_the_same_modules_and_norm_is_the_final_norm_only() -> None:
    targets = {"targets": ["q_proj"]}
    assert _saved_paths({**targets, "modules_to_save": ["lm_head"]}) == ["output"]
    assert _saved_paths({**targets, "modules_to_save": ["output"]}) == ["output"]
    assert _saved_paths({**targets, "modules_to_save": ["embed_tokens"]}) == ["tok_embeddings"]
    assert _saved_paths({**targets, "modules_to_save": ["norm"]}) == ["norm"]  # not attention_norm / ffn_norm
    assert _saved_paths({**targets, "modules_to_save": ["model.norm"]}) == ["norm"]
    every_input_norm = ["layers.0.attention_norm", "layers.1.attention_norm"]
    assert _saved_paths({**targets, "modules_to_save": ["input_layernorm"]}) == every_input_norm
    assert _saved_paths({**targets, "modules_to_save": ["attention_norm"]}) == every_input_norm
    one = {**targets, "modules_to_save": ["model.layers.1.post_attention_layernorm", "lm_head", "output"]}
    assert _saved_paths(one) == ["layers.1.ffn_norm", "output"]  # model order, each once


def test_an_unknown_name_is_one_line_listing_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        _adapted({"targets": ["q_proj"], "modules_to_save": ["lm_head", "classifier"]})
    message = str(info.value)
    assert "\n" not in message and "'lora.modules_to_save[1]': got 'classifier'" in message
    for valid in (
        "lm_head (output)",
        "embed_tokens (tok_embeddings)",
        "norm",
        "input_layernorm (attention_norm)",
    ):
        assert valid in message


def test_a_module_both_adapted_and_saved_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"plugin 'lora' adapts output: train it in full .* not both"):
        _adapted({"targets": ["q_proj", "output"], "modules_to_save": ["lm_head"]})


def test_saved_modules_train_with_the_adapters_and_the_rest_stays_frozen(
    capsys: pytest.CaptureFixture,
) -> None:
    model, config, pm, _ = _adapted({"targets": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "norm"]})
    adapters = set(lora.adapter_parameter_names(model))
    trainable = pm.trainable_names(model, config)
    assert trainable == adapters | {"output.weight", "norm.weight"}
    params = dict(model.named_parameters())
    # The coverage line names them and counts them: head 64 x 32 + norm 32, on top of the adapters.
    total = sum(params[n].numel() for n in trainable)
    line = capsys.readouterr().out
    assert "modules_to_save model.norm, lm_head: 2,080 parameters trained in full" in line
    assert f"{total:,} trainable parameters" in line
    before = {n: p.detach().clone() for n, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    optimizer = build_optimizer(
        model, OptimConfig(lr=1e-2), pm.param_groups(model, config), torch.device("cpu")
    )
    model(IDS).float().logsumexp(-1).mean().backward()
    optimizer.step()
    assert {n for n, p in params.items() if optimizer.state.get(p)} == trainable
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    # B starts at 0, so A gets no gradient at step 1; everything that changed is trainable, head and norm included.
    assert {"output.weight", "norm.weight"} <= changed <= trainable


def test_tied_embeddings_train_the_one_shared_matrix_for_either_name() -> None:
    for entry in ("lm_head", "embed_tokens"):
        model, config, pm, _ = _adapted({"targets": ["q_proj"], "modules_to_save": [entry]}, tie=True)
        assert model.output.weight is model.tok_embeddings.weight
        assert pm.trainable_names(model, config) == set(lora.adapter_parameter_names(model)) | {
            "tok_embeddings.weight"
        }


# --- export: stock peft loads it ----------------------------------------------------------------------------------


def _train_stand_in(model: nn.Module, names: list[str], seed: int = 1) -> None:
    """What training would leave: every LoRA ``B`` and every saved tensor moved to new values."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            assert isinstance(m, LoRALinear)
            m.lora.lora_B.copy_(torch.randn(m.lora.lora_B.shape, generator=g) * 0.3)
        for name in names:
            params[name].add_(torch.randn(params[name].shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    ("modules_to_save", "tie", "trained"),
    [
        (["lm_head"], False, ["output.weight"]),
        (["norm"], False, ["norm.weight"]),
        (
            ["embed_tokens", "input_layernorm"],
            True,
            ["tok_embeddings.weight", "layers.0.attention_norm.weight"],
        ),
    ],
    ids=["lm_head", "norm", "tied_embed_tokens_and_input_norms"],
)
def test_export_peft_loads_in_stock_peft_to_our_logits(
    tmp_path: Path, modules_to_save: list[str], tie: bool, trained: list[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, config, pm, base = _adapted(
        {"targets": ["q_proj", "v_proj"], "modules_to_save": modules_to_save}, tie
    )
    save_pretrained(base, tmp_path / "base")
    _train_stand_in(model, trained)
    out = tmp_path / "adapter"
    assert pm.hook.expertrain_export(model=model, config=config, output_dir=out, export_format="peft") == [
        ["adapter_model.safetensors", "adapter_config.json"]
    ]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    saved = [k for k in tensors if ".lora_" not in k]

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        before = hf_base(IDS).logits
        loaded = peft.PeftModel.from_pretrained(hf_base, str(out)).eval()
        got = loaded(IDS).logits
        expected = model(IDS)
    torch.testing.assert_close(got, expected, **LOGITS_TOL)
    assert (expected - before).abs().max() > 1e-2, "training must have moved the model for this to test it"

    # The saved modules alone account for a visible part of that move (peft must not have dropped them).
    without = {k: v for k, v in tensors.items() if ".lora_" in k}
    frozen_protocol = tmp_path / "adapter_frozen"
    frozen_protocol.mkdir()
    save_file(without, str(frozen_protocol / "adapter_model.safetensors"))
    frozen_config = {**adapter_config, "modules_to_save": None}
    frozen_config.pop("ensure_weight_tying", None)
    (frozen_protocol / "adapter_config.json").write_text(json.dumps(frozen_config))
    with torch.no_grad():
        fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        adapters_only = peft.PeftModel.from_pretrained(fresh, str(frozen_protocol)).eval()(IDS).logits
    assert (adapters_only - expected).abs().max() > 1e-2

    if tie:
        assert adapter_config["ensure_weight_tying"] is True
        assert "model.embed_tokens" in adapter_config["modules_to_save"]
        assert "lm_head" not in adapter_config["modules_to_save"]
        assert torch.equal(
            tensors["base_model.model.lm_head.weight"], tensors["base_model.model.model.embed_tokens.weight"]
        )
        hf = loaded.get_base_model()
        assert torch.equal(hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)
        torch.testing.assert_close(hf.get_output_embeddings().weight, model.output.weight, rtol=0, atol=0)
    else:
        assert "ensure_weight_tying" not in adapter_config
    # The same keys and modules_to_save that peft's own save_pretrained writes for this configuration.
    theirs_dir = tmp_path / "peft_own"
    hf_again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=list(adapter_config["modules_to_save"]),
        ensure_weight_tying=tie,
    )
    peft.get_peft_model(hf_again, peft_config).save_pretrained(str(theirs_dir))
    theirs = load_file(str(theirs_dir / "adapter_model.safetensors"))
    their_config = json.loads((theirs_dir / "adapter_config.json").read_text())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert sorted(adapter_config["modules_to_save"]) == sorted(their_config["modules_to_save"])
    assert saved, "the saved modules' tensors are in the adapter"
