"""``parallel.param_dtype`` / ``reduce_dtype`` / ``cpu_offload``: accepted where FSDP2 shards, one line elsewhere."""

from __future__ import annotations

import pytest

from framework.config import ConfigError, check_world, load_raw, resolve


def job(*overrides: str):
    return resolve(load_raw(None, list(overrides)))


def test_defaults_are_plain_fp32_fsdp() -> None:
    parallel = job().parallel
    assert (parallel.param_dtype, parallel.reduce_dtype, parallel.cpu_offload) == ("fp32", "fp32", False)
    assert parallel.fsdp_options() == {}


def test_options_are_accepted_with_fsdp_on_two_ranks_with_or_without_autocast() -> None:
    for dtype in ("fp32", "bf16"):
        cfg = job("parallel.param_dtype=bf16", "parallel.reduce_dtype=bf16", f"train.dtype={dtype}")
        assert check_world(cfg, 2) == 2  # 16 sequences / (2 ranks x 4)
        assert cfg.parallel.fsdp_options() == {
            "param_dtype": ("bf16", "fp32"),
            "reduce_dtype": ("bf16", "fp32"),
        }
    for device in ("auto", "cuda"):
        assert job("parallel.cpu_offload=true", f"train.device={device}").parallel.cpu_offload is True


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["parallel.param_dtype=fp16"], r"'parallel.param_dtype': got 'fp16'; expected one of 'fp32', 'bf16'"),
        (["parallel.param_dtype=bf16", "train.engine=deepspeed"], r"'parallel.param_dtype': got 'bf16'; expected fp32 with train.engine=deepspeed: an FSDP2 option .*or use train.engine=native"),
        (["parallel.cpu_offload=true", "train.engine=deepspeed"], r"'parallel.cpu_offload': got True; expected false with train.engine=deepspeed"),
        (["parallel.reduce_dtype=bf16", "parallel.data=ddp"], r"'parallel.reduce_dtype': got 'bf16'; expected fp32 with parallel.data=ddp: an FSDP2 option; or use parallel.data=fsdp"),
        (["parallel.cpu_offload=true", "train.device=cpu"], r"'parallel.cpu_offload': got True; expected false with train.device=cpu .*offloading is for train.device=cuda"),
    ],
)  # fmt: skip
def test_where_the_options_cannot_apply_is_one_line(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        job(*overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("option", ["parallel.param_dtype=bf16", "parallel.cpu_offload=true"])
def test_one_data_parallel_rank_is_refused_with_the_autocast_alternative(option: str) -> None:
    cfg = job(option, "train.global_batch_size=4", "train.micro_batch_size=2")
    assert check_world(cfg, 2) == 1
    with pytest.raises(
        ConfigError, match=r"with 1 data-parallel rank: an FSDP2 option.*train.dtype=bf16"
    ) as info:
        check_world(cfg, 1)
    assert "\n" not in str(info.value)
