"""Small configs for the model tests, built in one line (imported by module name: pytest puts this folder on
sys.path in its default ``prepend`` import mode)."""

from __future__ import annotations

from framework.config.sections import ModelConfig, MoEConfig


def model_cfg(**overrides: object) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def moe_cfg(**overrides: object) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_hidden=48)
    base.update(overrides)
    return MoEConfig(**base)  # type: ignore[arg-type]
