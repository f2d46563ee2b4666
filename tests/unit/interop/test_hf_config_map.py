"""config.json <-> our sections without building models: defaults pinned to transformers, exports readable back."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from framework.interop.hf.config_map import (  # noqa: E402
    ARCHITECTURES,
    FAMILY_DEFAULTS,
    HFConfigError,
    hf_config_from_spec,
    spec_from_hf_config,
)

_RENAMED = {"rope_theta", "rope_scaling", "rope_parameters", "head_dim", "num_key_value_heads"}


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_family_defaults_equal_transformers(family: str) -> None:
    """A field missing from config.json must mean what transformers makes of it."""
    from transformers import AutoConfig

    hf = AutoConfig.for_model(family)
    theta = hf.rope_parameters["rope_theta"]
    assert FAMILY_DEFAULTS[family]["rope_theta"] == theta
    for name, value in FAMILY_DEFAULTS[family].items():
        if name in _RENAMED:
            continue
        assert getattr(hf, name) == value, f"{family}.{name}"


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_defaults_only_config_reads_and_exports_back(family: str) -> None:
    """``{"model_type": f}`` alone is transformers' default model; our export of it reads back to the same spec."""
    spec = spec_from_hf_config({"model_type": family})
    again = spec_from_hf_config(hf_config_from_spec(spec))
    assert again == spec


def test_legacy_top_level_rope_theta_and_null_rope_scaling() -> None:
    spec = spec_from_hf_config({"model_type": "llama", "rope_theta": 5e5, "rope_scaling": None})
    assert spec.model.rope_theta == 5e5


def test_unknown_family_is_named() -> None:
    with pytest.raises(HFConfigError, match="'model_type': got 'gpt2'"):
        spec_from_hf_config({"model_type": "gpt2"})


def test_deepseek_remote_code_fields_checked() -> None:
    base = {
        "model_type": "deepseek_v3",
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
    }
    spec = spec_from_hf_config({**base, "aux_loss_alpha": 1e-4, "seq_aux": True})
    assert spec.moe.seq_aux_loss_coef == 1e-4 and spec.moe.bias_update_rate > 0
    with pytest.raises(HFConfigError, match="'scoring_func': got 'softmax'"):
        spec_from_hf_config({**base, "scoring_func": "softmax"})
