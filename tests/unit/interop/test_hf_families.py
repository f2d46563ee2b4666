"""HF checkpoint folders of every supported family in and out: logits against transformers, bit-exact round trips,
transformers reading what we write, and the errors for what we cannot load.

Each family is a tiny random fp32 model built from a transformers config (2 layers, 4 experts), saved with
transformers' own ``save_pretrained`` (its on-disk layout: per-expert MoE keys, Mixtral's ``block_sparse_moe``).
Weights are drawn at std 0.2 (norms around 1, DeepSeek correction biases in [0, 0.2]) so that every part of the
model moves the logits.

Tolerance: logits agree to 1e-5 absolute at logits of magnitude ~3-5: the same fp32 math summed in another order
(SDPA vs transformers' attention kernel, our grouped experts vs its per-expert loop), a few ulp per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from framework.hooks import PluginManager  # noqa: E402
from framework.interop.hf import (  # noqa: E402
    HFCheckpointError,
    HFConfigError,
    from_pretrained,
    hf_config_to_job_sections,
    load_pretrained,
    save_pretrained,
)
from framework.models import Transformer, default_registry  # noqa: E402

LOGITS_ATOL = 1e-5  # fp32, same math in another summation order (see the module docstring)
VOCAB, SEQ = 64, 12

COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MOE: dict[str, Any] = dict(num_experts_per_tok=2, moe_intermediate_size=24)


def _hf_config(family: str, **extra: Any) -> Any:
    from transformers import (
        DeepseekV3Config,
        LlamaConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    classes = {
        "llama": (LlamaConfig, {}),
        "qwen2": (Qwen2Config, {}),
        "mixtral": (MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_moe": (Qwen3MoeConfig, dict(head_dim=12, num_experts=4, norm_topk_prob=True, **MOE)),
        "qwen2_moe": (Qwen2MoeConfig, dict(num_experts=4, shared_expert_intermediate_size=40, **MOE)),
        "deepseek_v3": (
            DeepseekV3Config,
            dict(
                num_key_value_heads=4,
                q_lora_rank=16,
                kv_lora_rank=16,
                qk_nope_head_dim=8,
                qk_rope_head_dim=8,
                v_head_dim=12,
                n_routed_experts=4,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                **MOE,
            ),
        ),
    }
    cls, own = classes[family]
    return cls(**{**COMMON, **own, **extra})


FAMILIES = ["llama", "qwen2", "mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"]


def _hf_model(family: str, **extra: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(family, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)  # biases and norm weights
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.2)
    return model


def _saved(tmp_path: Path, family: str, **extra: Any) -> tuple[torch.nn.Module, Path]:
    hf = _hf_model(family, **extra)
    folder = tmp_path / f"hf_{family}"
    hf.save_pretrained(folder)
    return hf, folder


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 3 full rows (no padding) and packed-document positions (documents of 5 and 7 tokens)."""
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(5), torch.arange(SEQ - 5)]).expand(3, SEQ)
    return ids, pos


def _assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    ids, pos = _inputs()
    with torch.no_grad():
        for kwargs in ({}, {"position_ids": pos}):
            # use_cache=False: transformers then masks attention between packed documents, as we do.
            expected = hf(ids, **kwargs, use_cache=False).logits
            got = ours(ids, **kwargs)
            assert expected.abs().max() > 1.0  # a scale at which 1e-5 is tight
            torch.testing.assert_close(got, expected, rtol=0, atol=LOGITS_ATOL)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name in set(json.loads(index.read_text())["weight_map"].values()):
        out.update(load_file(folder / name))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_matches_logits_and_round_trips(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    hf, folder = _saved(tmp_path, family)
    ours = from_pretrained(folder)
    _assert_same_logits(ours, hf)

    out = tmp_path / "ours"
    written = save_pretrained(ours, out)
    assert written == ["config.json", "model.safetensors"]
    original, exported = _tensors(folder), _tensors(out)
    assert set(exported) == set(original)
    different = [k for k in original if not torch.equal(original[k], exported[k])]
    assert not different, f"tensors changed in the round trip: {different}"
    assert json.loads((out / "config.json").read_text())["model_type"] == family

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    _assert_same_logits(ours, reloaded.eval())


def test_qwen3_moe_parts_are_config_options(tmp_path: Path) -> None:
    """qwen3_moe: q/k norms, head_dim != dim/heads, renormalised top-k: all ModelConfig/MoEConfig fields."""
    _, folder = _saved(tmp_path, "qwen3_moe", attention_bias=True)
    sections = hf_config_to_job_sections(folder)
    model = sections["model"]
    assert (model["qk_norm"], model["qkv_bias"], model["o_bias"], model["head_dim"]) == (True, True, True, 12)
    assert sections["moe"]["route_norm"] is True and "plugins" not in sections


def test_llama_attention_bias_and_tied_embeddings(tmp_path: Path) -> None:
    hf, folder = _saved(tmp_path, "llama", attention_bias=True, tie_word_embeddings=True)
    assert "lm_head.weight" not in _tensors(folder)
    ours = from_pretrained(folder)
    assert ours.output.weight is ours.tok_embeddings.weight
    _assert_same_logits(ours, hf)
    save_pretrained(ours, tmp_path / "out")
    assert set(_tensors(tmp_path / "out")) == set(_tensors(folder))


@pytest.mark.parametrize("interleave", [True, False])
def test_deepseek_rope_layout(tmp_path: Path, interleave: bool) -> None:
    """DeepSeek's interleaved RoPE is a row reordering of the projections on import; both layouts match HF, and
    reading a checkpoint with the wrong flag really changes the logits (the reordering is not a no-op)."""
    hf, folder = _saved(tmp_path, "deepseek_v3", rope_interleave=interleave)
    _assert_same_logits(from_pretrained(folder), hf)
    config = json.loads((folder / "config.json").read_text())
    config["rope_interleave"] = not interleave
    (folder / "config.json").write_text(json.dumps(config))
    ids, _ = _inputs()
    with torch.no_grad():
        assert not torch.allclose(from_pretrained(folder)(ids), hf(ids).logits, atol=1e-3)


def test_sharded_folder_in_and_out(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf, folder = _saved(tmp_path, "mixtral")
    ours = from_pretrained(folder)
    written = save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = [w for w in written if w.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in written
    _assert_same_logits(from_pretrained(tmp_path / "sharded"), hf)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_logits(ours, reloaded.eval())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_reads_fused_in_memory_expert_layout(tmp_path: Path, family: str) -> None:
    """A checkpoint written from transformers' in-memory state dict (fused gate_up_proj [E, 2I, D], Mixtral under
    ``mlp.``) loads like the per-expert hub layout."""
    hf, folder = _saved(tmp_path, family)
    fused = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    (folder / "model.safetensors").unlink()
    save_file(fused, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_logits(from_pretrained(folder), hf)


def _rewrite(folder: Path, edit: Any) -> None:
    tensors = _tensors(folder)
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_stray_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, "qwen3_moe")
    key = "model.layers.1.mlp.experts.4.up_proj.weight"  # an expert beyond num_experts=4
    _rewrite(folder, lambda t: t.__setitem__(key, torch.zeros(24, 32)))
    with pytest.raises(HFCheckpointError, match=rf"'{key}' is not used by the qwen3_moe converter"):
        from_pretrained(folder)

    _, folder = _saved(tmp_path / "b", "qwen3_moe")
    key = "model.layers.0.self_attn.k_norm.weight"
    _rewrite(folder, lambda t: t.pop(key))
    with pytest.raises(HFCheckpointError, match=rf"'{key}' is missing"):
        from_pretrained(folder)

    _, folder = _saved(tmp_path / "c", "mixtral")
    key = "model.layers.0.block_sparse_moe.gate.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, torch.zeros(5, 32)))
    with pytest.raises(HFCheckpointError, match=rf"'{key}' has shape \(5, 32\)"):
        from_pretrained(folder)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, "llama")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="pytorch_model.bin are pickles"):
        from_pretrained(folder)


REFUSED = [
    (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
        "rope_parameters",
    ),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3_moe", {"mlp_only_layers": [0], "num_hidden_layers": 2}, None),  # accepted: first_k_dense=1
    ("qwen3_moe", {"decoder_sparse_step": 3, "num_hidden_layers": 2}, "mlp_only_layers"),
    ("deepseek_v3", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("llama", {"some_new_field": 1}, "some_new_field"),
]


@pytest.mark.parametrize(("family", "change", "field"), REFUSED)
def test_unrepresentable_config_fields_are_refused_by_name(
    tmp_path: Path, family: str, change: dict[str, Any], field: str | None
) -> None:
    _, folder = _saved(tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    if field is None:
        assert hf_config_to_job_sections(folder)["moe"]["first_k_dense"] == 1
        return
    with pytest.raises(HFConfigError, match=rf"Hugging Face config field '{field}[.']"):
        from_pretrained(folder)


def test_qwen_moe_placement_maps_to_first_k_dense_and_every(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, "qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
    moe = hf_config_to_job_sections(folder)["moe"]
    assert (moe["first_k_dense"], moe["every"]) == (1, 2)  # HF: layers 1 and 3 are MoE
    ours = from_pretrained(folder)
    assert [b.is_moe for b in ours.layers] == [False, True, False, True]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_families_load_and_export_with_no_plugin(tmp_path: Path, family: str) -> None:
    """Shared experts are a core MoE submodule: a manager with no plugin loads and re-exports the folder, every
    tensor bit for bit."""
    _, folder = _saved(tmp_path, family)
    pm = PluginManager(default_registry())
    pm.load([])
    loaded = load_pretrained(folder, plugin_manager=pm)
    assert pm.plugin_names == [] and loaded.config.plugins == []
    sections = hf_config_to_job_sections(folder)
    moe = sections["moe"]
    assert "plugins" not in sections and moe["block"] == "moe" and moe["shared_experts"] == 1
    assert moe["shared_expert_gate"] is (family == "qwen2_moe")
    save_pretrained(loaded.model, tmp_path / "out")
    before, after = _tensors(folder), _tensors(tmp_path / "out")
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_variant_block_exports_as_the_core_block_it_computes(tmp_path: Path) -> None:
    """deepseek_moe without segmentation (shared experts on top) computes what the core block computes: its model
    exports as qwen2_moe, read from the built blocks, and loads back to the same logits; a Chain-of-Experts block
    (two routing sites) is refused naming moe.block."""
    from framework.config import resolve

    raw: dict[str, Any] = {
        "model": dict(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=32
        ),
        "moe": dict(num_experts=4, top_k=2, expert_hidden=24, shared_experts=1, shared_expert_hidden=40),
        "data": dict(seq_len=32),
    }
    raw["moe"].update(shared_expert_gate=True, route_norm=False, aux_loss_coef=0.0)
    for plugin, section in (
        ("deepseek_moe", {"isolate_shared": False}),
        ("chain_of_experts", {"iterations": 2}),
    ):
        pm = PluginManager(default_registry())
        pm.load([plugin])
        config = resolve(
            {**raw, "plugins": [plugin], "moe": {**raw["moe"], "block": plugin}, plugin: section},
            pm.config_sections,
        )
        pm.hook.expertrain_validate_config(config=config, world_size=1)
        ours = Transformer(config.model, config.moe, pm.registry)
        ours.init_weights(0)
        if plugin == "chain_of_experts":
            with pytest.raises(HFConfigError, match="'moe.block'"):
                save_pretrained(ours, tmp_path / plugin)
            continue
        save_pretrained(ours, tmp_path / plugin)
        back = from_pretrained(tmp_path / plugin)
        assert back.moe_cfg.block == "moe" and back.moe_cfg.shared_expert_hidden == 40
        ids, _ = _inputs()
        with torch.no_grad():
            assert torch.equal(back(ids), ours(ids.clone()))


def test_export_refuses_a_model_the_family_cannot_hold(tmp_path: Path) -> None:
    _, folder = _saved(tmp_path, "qwen3_moe")
    ours = from_pretrained(folder)
    with pytest.raises(HFConfigError, match="'model.qk_norm'"):
        save_pretrained(ours, tmp_path / "out", family="mixtral")
