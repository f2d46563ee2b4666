"""``train.engine`` and the ``deepspeed`` section: what DeepSpeed runs, and one line for what it does not."""

from __future__ import annotations

import pytest

from framework.config import ConfigError, load_raw, resolve


def job(*overrides: str):
    return resolve(load_raw(None, list(overrides)))


def test_native_is_the_default_and_deepspeed_options_are_typed() -> None:
    assert job().train.engine == "native"
    cfg = job("train.engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.reduce_bucket_size=1000000")
    assert (cfg.train.engine, cfg.deepspeed.zero_stage, cfg.deepspeed.reduce_bucket_size) == (
        "deepspeed",
        3,
        10**6,
    )
    assert job("train.engine=deepspeed", "parallel.ep=2", "deepspeed.zero_stage=1").parallel.ep == 2
    # The native engine ignores the section, whatever it says.
    assert job("parallel.tp=2", "deepspeed.zero_stage=3", "train.compile=true").parallel.tp == 2


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.engine=megatron"], r"'train.engine': got 'megatron'; expected one of 'native', 'deepspeed'"),
        (["train.engine=deepspeed", "deepspeed.zero_stage=4"], r"'deepspeed.zero_stage': got 4; expected an integer >= 0 and <= 3"),
        (["train.engine=deepspeed", "parallel.tp=2"], r"'parallel.tp': got 2; expected 1 with train.engine=deepspeed .*use train.engine=native"),
        (["train.engine=deepspeed", "parallel.dp_replicate=2"], r"'parallel.dp_replicate': got 2; expected 1 with train.engine=deepspeed"),
        (["train.engine=deepspeed", "parallel.ep=2", "deepspeed.zero_stage=3"], r"'deepspeed.zero_stage': got 3; expected 0, 1 or 2 with parallel.ep=2"),
        (["train.engine=deepspeed", "train.compile=true", "deepspeed.zero_stage=3"], r"'train.compile': got True; expected false with deepspeed.zero_stage=3"),
    ],
)  # fmt: skip
def test_what_deepspeed_cannot_run_is_one_line(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        job(*overrides)
    assert "\n" not in str(info.value)
