"""The small job shapes the plugin and export unit tests build (config sections, as a job file holds them)."""

from __future__ import annotations

from typing import Any

MODEL: dict[str, Any] = {  # the model section every job below shares
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden": 48,
    "max_seq_len": 16,
    "vocab_size": 64,
}

MOE_JOB: dict[str, Any] = {
    "model": dict(MODEL),
    "moe": {"num_experts": 4, "expert_hidden": 24, "every": 2},  # layer 0 MoE, layer 1 dense
    "data": {"seq_len": 16},
}
"""Two layers, the first an MoE block of 4 experts."""

MOE_JOB_4_LAYERS: dict[str, Any] = {**MOE_JOB, "model": {**MODEL, "n_layers": 4}}
"""Four layers, MoE blocks at layers 0 and 2."""

DENSE_JOB: dict[str, Any] = {"model": dict(MODEL), "moe": {"num_experts": 0}, "data": {"seq_len": 16}}
"""Two dense layers."""
