"""Hugging Face ``config.json`` ↔ our model sections, per family (``model_type``).

:func:`spec_from_hf_config` reads a config.json mapping into an :class:`HFModelSpec` (``ModelConfig`` and
``MoEConfig``); :func:`hf_config_from_spec` writes one back. Supported families: ``llama``, ``qwen2``, ``mixtral``,
``qwen3_moe``, ``qwen2_moe`` and ``deepseek_v3``, all built from core components (the shared experts of the last two
are the core MoE layer's ``moe.shared_experts``): no plugin is needed to load or export them.

Every field of a config.json is either mapped, known to leave the weights and the forward pass unchanged (ids of
special tokens, ``use_cache``, dtype, ...), or refused: a value we cannot represent exactly (RoPE scaling, a sliding
window, another activation, a bias layout we lack, an unknown field) raises :class:`HFConfigError` naming the field
and the value, so a checkpoint is never loaded silently wrong. A field absent from the file takes the default of
that family's transformers config class (``FAMILY_DEFAULTS``, pinned against transformers by the tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from framework.config.errors import ConfigError
from framework.config.schema import build_section
from framework.config.sections import ModelConfig, MoEConfig

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
"""Supported ``model_type`` values and the transformers class :func:`hf_config_from_spec` names."""

DEEPSEEK_BIAS_UPDATE_RATE = 1e-3
"""``moe.bias_update_rate`` given to an imported deepseek_v3 (DeepSeek-V3's gamma); its routers need the bias."""

_COMMON_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "head_dim": None,
    "num_key_value_heads": None,
    "rope_parameters": None,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON_DEFAULTS,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        **_COMMON_DEFAULTS,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
    },
    "mixtral": {
        **_COMMON_DEFAULTS,
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    },
    "qwen3_moe": {
        **_COMMON_DEFAULTS,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
    },
    "qwen2_moe": {
        **_COMMON_DEFAULTS,
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 32768,
        "qkv_bias": True,
        "use_sliding_window": False,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
    },
    "deepseek_v3": {
        **_COMMON_DEFAULTS,
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_interleave": True,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "n_shared_experts": 1,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 3,
    },
}
"""Per family, the transformers (5.x) default of every field this module reads, used when config.json omits it."""

_ALIASES: dict[str, dict[str, str]] = {
    "mixtral": {"num_experts": "num_local_experts"},
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "deepseek_v3": {"num_local_experts": "n_routed_experts"},
}
"""transformers' ``attribute_map``: another spelling a config.json may use for a field (left: alias, right: field)."""

NEUTRAL_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_router_logits",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "pretraining_tp",
        "num_nextn_predict_layers",
        "ep_size",
        "qk_head_dim",
    }
)
"""Fields that change neither the weights nor the forward pass of the causal LM (``pretraining_tp`` is unused by
transformers 5; ``num_nextn_predict_layers`` describes DeepSeek's multi-token-prediction layers, which transformers
does not build either; ``qk_head_dim`` is checked against its parts)."""


class HFConfigError(ConfigError):
    """A config.json field whose value expertrain cannot represent exactly (or a model a family cannot hold)."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        super().__init__(key, value, expected)
        ValueError.__init__(self, f"Hugging Face config field '{key}': got {value!r}; {expected}")


@dataclass
class HFModelSpec:
    """What an HF config.json describes, in our terms."""

    family: str
    """The ``model_type``."""
    model: ModelConfig
    moe: MoEConfig
    rope_interleave: bool = False
    """deepseek_v3: the checkpoint's rotated q/k dimensions are interleaved pairs (the state map reorders them)."""

    def job_sections(self) -> dict[str, Any]:
        """``model`` and ``moe`` as a job-file mapping (``model.init_from`` left out), to merge into a job that starts
        from this checkpoint."""
        model = dataclasses.asdict(self.model)
        model.pop("init_from")
        return {"model": model, "moe": dataclasses.asdict(self.moe)}


# --------------------------------------------------------------------------------------------------- reading


class _Fields:
    """A config.json mapping with the family's defaults and aliases; remembers which fields were read."""

    def __init__(self, raw: Mapping[str, Any], family: str) -> None:
        self.family = family
        self.raw = dict(raw)
        for alias, name in _ALIASES.get(family, {}).items():
            if alias in self.raw and name not in self.raw:
                self.raw[name] = self.raw.pop(alias)
        self.defaults = FAMILY_DEFAULTS[family]
        self.used: set[str] = set()

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.raw[name] if name in self.raw else self.defaults.get(name)

    def expect(self, name: str, allowed: tuple[Any, ...], why: str) -> Any:
        value = self.get(name)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            shown = " or ".join(repr(a) for a in allowed)
            raise HFConfigError(name, value, f"expected {shown} for {self.family}: {why}")
        return value

    def positive_int(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HFConfigError(name, value, "expected a positive integer")
        return value

    def check_all_used(self) -> None:
        for name, value in self.raw.items():
            if name not in self.used and name not in NEUTRAL_FIELDS:
                raise HFConfigError(
                    name,
                    value,
                    f"expected no such field in a {self.family} config: expertrain does not know whether it changes "
                    "the model, so it refuses to load it rather than load it wrong",
                )


def _rope(f: _Fields) -> float:
    """RoPE base; anything but plain RoPE (scaling, partial rotation) is refused."""
    params = f.get("rope_parameters")
    scaling = f.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict) or _rope_type(scaling) != "default"):
        raise HFConfigError("rope_scaling", scaling, "expected null: expertrain implements plain RoPE only")
    theta = f.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise HFConfigError("rope_parameters", params, "expected a mapping")
        if _rope_type(params) != "default":
            raise HFConfigError(
                "rope_parameters.rope_type",
                _rope_type(params),
                "expected 'default': expertrain implements plain RoPE only (no llama3/yarn/linear/dynamic scaling)",
            )
        for key, value in params.items():
            if key == "partial_rotary_factor" and value != 1.0:
                raise HFConfigError(f"rope_parameters.{key}", value, "expected 1.0 (RoPE on the whole head)")
            if key not in ("rope_theta", "rope_type", "type", "partial_rotary_factor"):
                raise HFConfigError(f"rope_parameters.{key}", value, "expected only rope_theta and rope_type")
        theta = params.get("rope_theta", theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise HFConfigError("rope_parameters.rope_theta", theta, "expected a positive number")
    return float(theta)


def _rope_type(params: Mapping[str, Any]) -> Any:
    return params.get("rope_type", params.get("type", "default"))


def _common_model(f: _Fields) -> dict[str, Any]:
    """The fields every family shares: sizes, norms, RoPE, ties, init."""
    f.expect("hidden_act", ("silu",), "expertrain's MLPs and experts are SwiGLU")
    dropout = f.get("attention_dropout")
    if dropout not in (0, 0.0, None):
        raise HFConfigError("attention_dropout", dropout, "expected 0.0: expertrain has no attention dropout")
    n_heads = f.positive_int("num_attention_heads")
    kv_heads = f.get("num_key_value_heads") or n_heads
    head_dim = f.get("head_dim") or 0
    dim = f.positive_int("hidden_size")
    tie = f.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        raise HFConfigError("tie_word_embeddings", tie, "expected true or false")
    return {
        "vocab_size": f.positive_int("vocab_size"),
        "dim": dim,
        "n_layers": f.positive_int("num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": kv_heads,
        "head_dim": 0 if head_dim == dim // n_heads and dim % n_heads == 0 else head_dim,
        "ffn_hidden": f.positive_int("intermediate_size"),
        "max_seq_len": f.positive_int("max_position_embeddings"),
        "rope_theta": _rope(f),
        "norm_eps": float(f.get("rms_norm_eps")),
        "tie_embeddings": tie,
        "init_std": float(f.get("initializer_range")),
    }


def _no_sliding_window(f: _Fields) -> None:
    """Qwen families: ``use_sliding_window`` must be off (then ``sliding_window`` / ``max_window_layers`` are unused)."""
    f.expect("use_sliding_window", (False,), "expertrain attends over the whole causal context")
    f.get("sliding_window")
    f.get("max_window_layers")
    layer_types = f.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise HFConfigError("layer_types", layer_types, "expected only 'full_attention' layers")


def _moe_placement(f: _Fields, n_layers: int) -> tuple[int, int]:
    """Qwen's ``decoder_sparse_step`` / ``mlp_only_layers`` as our ``(first_k_dense, every)``, or refused."""
    step = f.positive_int("decoder_sparse_step")
    only = f.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise HFConfigError("mlp_only_layers", only, "expected a list of layer indices")
    hf_moe = [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]
    if not hf_moe:
        raise HFConfigError(
            "mlp_only_layers", only, "expected at least one MoE layer (a dense model is llama/qwen2)"
        )
    first = hf_moe[0]
    every = hf_moe[1] - hf_moe[0] if len(hf_moe) > 1 else n_layers
    ours = [i for i in range(first, n_layers) if (i - first) % every == 0]
    if ours != hf_moe:
        key, value = ("mlp_only_layers", only) if only else ("decoder_sparse_step", step)
        raise HFConfigError(
            key,
            value,
            f"expected MoE layers expertrain can place (the first k dense, then every m-th): these give {hf_moe}",
        )
    return first, every


def _read_llama(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    bias = f.get("attention_bias")
    f.expect("mlp_bias", (False,), "expertrain's MLPs have no bias")
    model.update(qkv_bias=bool(bias), o_bias=bool(bias))
    return HFModelSpec("llama", _model(model), _moe({"num_experts": 0}))


def _read_qwen2(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    _no_sliding_window(f)
    model.update(qkv_bias=True)
    return HFModelSpec("qwen2", _model(model), _moe({"num_experts": 0}))


def _read_mixtral(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    window = f.get("sliding_window")
    if window is not None:
        raise HFConfigError(
            "sliding_window", window, "expected null: expertrain attends over the whole context"
        )
    jitter = f.get("router_jitter_noise")
    if jitter not in (0, 0.0):
        raise HFConfigError("router_jitter_noise", jitter, "expected 0.0: expertrain's router has no jitter")
    moe = {
        "num_experts": f.positive_int("num_local_experts"),
        "top_k": f.positive_int("num_experts_per_tok"),
        "expert_hidden": model["ffn_hidden"],
        "score_func": "softmax",
        "route_norm": True,
        "aux_loss_coef": float(f.get("router_aux_loss_coef")),
    }
    return HFModelSpec("mixtral", _model(model), _moe(moe))


def _qwen_moe(f: _Fields, model: dict[str, Any]) -> dict[str, Any]:
    norm = f.get("norm_topk_prob")
    if not isinstance(norm, bool):
        raise HFConfigError("norm_topk_prob", norm, "expected true or false")
    first, every = _moe_placement(f, model["n_layers"])
    return {
        "num_experts": f.positive_int("num_experts"),
        "top_k": f.positive_int("num_experts_per_tok"),
        "expert_hidden": f.positive_int("moe_intermediate_size"),
        "first_k_dense": first,
        "every": every,
        "score_func": "softmax",
        "route_norm": norm,
        "aux_loss_coef": float(f.get("router_aux_loss_coef")),
    }


def _read_qwen3_moe(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    _no_sliding_window(f)
    bias = f.get("attention_bias")
    model.update(qkv_bias=bool(bias), o_bias=bool(bias), qk_norm=True)
    return HFModelSpec("qwen3_moe", _model(model), _moe(_qwen_moe(f, model)))


def _read_qwen2_moe(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    _no_sliding_window(f)
    model.update(qkv_bias=bool(f.get("qkv_bias")))
    moe = _qwen_moe(f, model)
    moe.update(
        shared_experts=1,
        shared_expert_hidden=f.positive_int("shared_expert_intermediate_size"),
        shared_expert_gate=True,
    )
    return HFModelSpec("qwen2_moe", _model(model), _moe(moe))


def _read_deepseek_v3(f: _Fields) -> HFModelSpec:
    model = _common_model(f)
    f.expect("attention_bias", (False,), "expertrain's mla has no projection biases")
    q_lora = f.get("q_lora_rank") or 0
    nope, rope = f.positive_int("qk_nope_head_dim"), f.positive_int("qk_rope_head_dim")
    for derived, value in (("head_dim", rope), ("qk_head_dim", nope + rope)):
        if derived in f.raw and f.raw[derived] != value:
            raise HFConfigError(
                derived, f.raw[derived], f"expected {value} (derived from qk_nope/qk_rope_head_dim)"
            )
    interleave = f.get("rope_interleave")
    if not isinstance(interleave, bool):
        raise HFConfigError("rope_interleave", interleave, "expected true or false")
    if model["n_kv_heads"] != model["n_heads"]:
        raise HFConfigError(
            "num_key_value_heads",
            model["n_kv_heads"],
            f"expected num_attention_heads={model['n_heads']} for mla",
        )
    model.update(
        head_dim=0,
        attention="mla",
        q_lora_rank=q_lora,
        kv_lora_rank=f.positive_int("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=f.positive_int("v_head_dim"),
    )
    f.expect("norm_topk_prob", (True,), "expertrain always renormalises sigmoid gate weights")
    _deepseek_remote_code_fields(f)
    n_layers = model["n_layers"]
    first = f.get("first_k_dense_replace")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < n_layers:
        raise HFConfigError("first_k_dense_replace", first, f"expected an integer in [0, {n_layers - 1}]")
    scale = f.get("routed_scaling_factor")
    moe = {
        "num_experts": f.positive_int("n_routed_experts"),
        "top_k": f.positive_int("num_experts_per_tok"),
        "expert_hidden": f.positive_int("moe_intermediate_size"),
        "first_k_dense": first,
        "shared_experts": f.positive_int("n_shared_experts"),
        "score_func": "sigmoid",
        "route_norm": True,
        "route_scale": float(scale),
        "n_groups": f.positive_int("n_group"),
        "topk_groups": f.positive_int("topk_group"),
        "aux_loss_coef": 0.0,
        "seq_aux_loss_coef": _deepseek_seq_aux(f),
        "bias_update_rate": DEEPSEEK_BIAS_UPDATE_RATE,
    }
    spec = HFModelSpec("deepseek_v3", _model(model), _moe(moe))
    spec.rope_interleave = interleave
    return spec


def _deepseek_remote_code_fields(f: _Fields) -> None:
    """Fields of DeepSeek's own config.json (remote code) that transformers ignores: accepted at their V3 values."""
    for name, allowed in (
        ("moe_layer_freq", (1,)),
        ("scoring_func", ("sigmoid",)),
        ("topk_method", ("noaux_tc",)),
    ):
        if name in f.raw:
            f.expect(name, allowed, "the only DeepSeek-V3 routing transformers implements")


def _deepseek_seq_aux(f: _Fields) -> float:
    """DeepSeek's remote-code ``aux_loss_alpha`` with ``seq_aux: true`` is our sequence-wise balance loss."""
    alpha = f.get("aux_loss_alpha") if "aux_loss_alpha" in f.raw else 0.0
    seq = f.get("seq_aux") if "seq_aux" in f.raw else True
    if alpha and not seq:
        raise HFConfigError(
            "seq_aux", seq, "expected true: expertrain has the sequence-wise DeepSeek-V3 loss"
        )
    return float(alpha or 0.0)


def _model(values: dict[str, Any]) -> ModelConfig:
    return build_section(ModelConfig, values, "model")


def _moe(values: dict[str, Any]) -> MoEConfig:
    return build_section(MoEConfig, values, "moe")


_READERS = {
    "llama": _read_llama,
    "qwen2": _read_qwen2,
    "mixtral": _read_mixtral,
    "qwen3_moe": _read_qwen3_moe,
    "qwen2_moe": _read_qwen2_moe,
    "deepseek_v3": _read_deepseek_v3,
}


def spec_from_hf_config(config: Mapping[str, Any]) -> HFModelSpec:
    """Read a config.json mapping; :class:`HFConfigError` names the first field that cannot be represented."""
    family = config.get("model_type")
    if family not in _READERS:
        raise HFConfigError(
            "model_type",
            family,
            f"expected one of {', '.join(ARCHITECTURES)} (the families expertrain converts)",
        )
    if config.get("quantization_config") is not None:
        raise HFConfigError(
            "quantization_config",
            config["quantization_config"],
            "expected none: dequantise the checkpoint to bf16/fp32 safetensors first",
        )
    fields = _Fields(config, family)
    spec = _READERS[family](fields)
    fields.used.add("quantization_config")
    fields.check_all_used()
    return spec


# --------------------------------------------------------------------------------------------------- writing


def _refuse(key: str, value: object, family: str, expected: str) -> HFConfigError:
    return HFConfigError(key, value, f"expected {expected} to export as {family}")


def hf_config_from_spec(spec: HFModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of ``spec`` for transformers (``model_type``, ``architectures`` and every field that differs
    from nothing: written in full, so the file does not depend on transformers' defaults). Raises
    :class:`HFConfigError` naming our field when the family cannot hold the model."""
    family, m, moe = spec.family, spec.model, spec.moe
    if family not in ARCHITECTURES:
        raise HFConfigError("model_type", family, f"expected one of {', '.join(ARCHITECTURES)}")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": m.ffn_hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "dtype": dtype,
    }
    if m.attention != "mla":
        out["head_dim"] = m.resolved_head_dim
    if m.attention not in ("gqa", "mla") or (m.attention == "mla") != (family == "deepseek_v3"):
        raise _refuse("model.attention", m.attention, family, "'mla'" if family == "deepseek_v3" else "'gqa'")
    if family != "qwen3_moe" and m.qk_norm:
        raise _refuse("model.qk_norm", True, family, "false (only qwen3_moe has q/k norms)")
    if family == "qwen3_moe" and not m.qk_norm:
        raise _refuse("model.qk_norm", False, family, "true (qwen3_moe always normalises q/k heads)")
    _write_bias(out, m, family)
    if family in ("llama", "qwen2"):
        if moe.num_experts:
            raise _refuse("moe.num_experts", moe.num_experts, family, "0 (a dense family)")
        if family == "llama":
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out
    if not moe.num_experts:
        raise _refuse("moe.num_experts", 0, family, ">= 1 (an MoE family)")
    _write_moe(out, spec, family)
    return out


def _write_bias(out: dict[str, Any], m: ModelConfig, family: str) -> None:
    if family in ("llama", "qwen3_moe"):
        if m.qkv_bias != m.o_bias:
            raise _refuse(
                "model.o_bias", m.o_bias, family, f"model.qkv_bias={m.qkv_bias} (one attention_bias)"
            )
        out["attention_bias"] = m.qkv_bias
    elif family in ("qwen2", "qwen2_moe"):
        if m.o_bias:
            raise _refuse("model.o_bias", True, family, "false")
        if family == "qwen2" and not m.qkv_bias:
            raise _refuse("model.qkv_bias", False, family, "true (qwen2 always has q/k/v biases)")
        if family == "qwen2_moe":
            out["qkv_bias"] = m.qkv_bias
    else:
        for name in ("qkv_bias", "o_bias"):
            if getattr(m, name):
                raise _refuse(f"model.{name}", True, family, "false")
        if family == "deepseek_v3":
            out["attention_bias"] = False


def _check_routing(moe: MoEConfig, family: str, score: str) -> None:
    if moe.score_func != score:
        raise _refuse("moe.score_func", moe.score_func, family, repr(score))
    # The z-loss is a training loss only (the logits do not depend on it): not refused, not carried over.
    if moe.capacity_factor:
        raise _refuse("moe.capacity_factor", moe.capacity_factor, family, "0 (transformers routes dropless)")
    if score == "softmax":
        for name, value, ok in (
            ("route_scale", moe.route_scale, 1.0),
            ("n_groups", moe.n_groups, 1),
            ("bias_update_rate", moe.bias_update_rate, 0.0),
        ):
            if value != ok:
                raise _refuse(f"moe.{name}", value, family, repr(ok))


def _write_moe(out: dict[str, Any], spec: HFModelSpec, family: str) -> None:
    m, moe = spec.model, spec.moe
    shared = moe.shared_experts
    if moe.block != "moe":
        raise _refuse(
            "moe.block",
            moe.block,
            family,
            "'moe' (the core block; spec_from_model maps a variant that computes as it)",
        )
    wants_shared = family in ("qwen2_moe", "deepseek_v3")
    if bool(shared) != wants_shared:
        raise _refuse("moe.shared_experts", shared, family, ">= 1" if wants_shared else "0")
    if moe.shared_expert_gate != (family == "qwen2_moe") and wants_shared:
        raise _refuse(
            "moe.shared_expert_gate", moe.shared_expert_gate, family, str(family == "qwen2_moe").lower()
        )
    out["num_experts_per_tok"] = moe.top_k
    if family in ("mixtral",):
        _check_routing(moe, family, "softmax")
        if not moe.route_norm:
            raise _refuse("moe.route_norm", False, family, "true (Mixtral renormalises the top-k)")
        if moe.first_k_dense or moe.every != 1:
            raise _refuse(
                "moe.first_k_dense", moe.first_k_dense, family, "0 and moe.every=1 (all layers MoE)"
            )
        # Every layer is MoE, so model.ffn_hidden sizes nothing: Mixtral's one intermediate_size is the experts'.
        out.update(
            intermediate_size=moe.expert_hidden,
            num_local_experts=moe.num_experts,
            router_aux_loss_coef=moe.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
            head_dim=m.resolved_head_dim,
        )
        return
    if family == "deepseek_v3":
        _check_routing(moe, family, "sigmoid")
        if moe.every != 1:
            raise _refuse(
                "moe.every", moe.every, family, "1 (every layer after first_k_dense_replace is MoE)"
            )
        hidden = moe.shared_expert_hidden
        if hidden and hidden != shared * moe.expert_hidden:
            raise _refuse("moe.shared_expert_hidden", hidden, family, "0 (shared_experts*expert_hidden)")
        out.update(
            q_lora_rank=m.q_lora_rank or None,
            kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_nope_head_dim,
            qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            rope_interleave=spec.rope_interleave,
            n_routed_experts=moe.num_experts,
            moe_intermediate_size=moe.expert_hidden,
            n_shared_experts=shared,
            n_group=moe.n_groups,
            topk_group=moe.topk_groups,
            routed_scaling_factor=moe.route_scale,
            norm_topk_prob=True,
            first_k_dense_replace=moe.first_k_dense,
        )
        return
    _check_routing(moe, family, "softmax")
    step, only = _qwen_placement(moe, m.n_layers)
    out.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.expert_hidden,
        norm_topk_prob=moe.route_norm,
        decoder_sparse_step=step,
        mlp_only_layers=only,
        router_aux_loss_coef=moe.aux_loss_coef,
        use_sliding_window=False,
    )
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = moe.resolved_shared_hidden


def _qwen_placement(moe: MoEConfig, n_layers: int) -> tuple[int, list[int]]:
    """Our ``(first_k_dense, every)`` as Qwen's ``(decoder_sparse_step, mlp_only_layers)``."""
    ours = {i for i in range(moe.first_k_dense, n_layers) if (i - moe.first_k_dense) % moe.every == 0}
    step = moe.every if (moe.first_k_dense + 1) % moe.every == 0 else 1
    hf = {i for i in range(n_layers) if (i + 1) % step == 0}
    return step, sorted(hf - ours)
