"""The parallel layout's start-up checks: every bad combination is one ConfigError naming the key and the fix."""

from __future__ import annotations

import pytest

from framework.config import ConfigError
from framework.config.sections import ModelConfig, MoEConfig, ParallelConfig
from framework.parallel.mesh import ParallelLayout


def _model(**kw: object) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _layout(world: int, model: ModelConfig | None = None, moe: MoEConfig | None = None, **parallel: object):
    return ParallelLayout.from_config(
        ParallelConfig(**parallel),  # type: ignore[arg-type]
        world,
        model or _model(),
        moe or MoEConfig(num_experts=4, top_k=2, expert_hidden=32),
        seq_len=32,
    )


def test_sizes_of_a_valid_layout() -> None:
    layout = _layout(8, tp=2, ep=2, dp_replicate=2)
    assert (layout.dp, layout.dp_replicate, layout.dp_shard, layout.efsdp, layout.etp) == (4, 2, 2, 1, 2)
    assert layout.sequence_parallel
    assert "tp=2" in layout.describe() and "ep=2" in layout.describe()
    assert _layout(4, tp=2, etp=1).etp == 1
    assert not _layout(2).sequence_parallel  # only meaningful with tp > 1


@pytest.mark.parametrize(
    "world, parallel, model, moe, key, words",
    [
        (4, {"tp": 3}, None, None, "parallel.tp", "divisor of the world size 4"),
        (4, {"dp_replicate": 3}, None, None, "parallel.dp_replicate", "divisor of the data-parallel size 4"),
        (4, {"tp": 2, "ep": 4}, None, None, "parallel.ep", "borrows data-parallel ranks"),
        (2, {"ep": 2}, None, {"num_experts": 3, "top_k": 1}, "parallel.ep", "divisor of moe.num_experts=3"),
        (2, {"ep": 2}, None, {"num_experts": 0}, "parallel.ep", "dense model"),
        (2, {"tp": 2}, {"n_heads": 3, "n_kv_heads": 1}, None, "model.n_heads", "multiple of parallel.tp=2"),
        (2, {"tp": 2}, {"n_kv_heads": 1}, None, "model.n_kv_heads", "multiple of parallel.tp=2"),
        (2, {"tp": 2}, {"vocab_size": 97}, None, "model.vocab_size", "multiple of parallel.tp=2"),
        (2, {"tp": 2}, {"ffn_hidden": 63}, None, "model.ffn_hidden", "multiple of parallel.tp=2"),
        (
            2,
            {"tp": 2},
            None,
            {"num_experts": 4, "expert_hidden": 33},
            "moe.expert_hidden",
            "expert tensor-parallel",
        ),
    ],
)
def test_bad_layouts_name_the_key(
    world: int, parallel: dict, model: dict | None, moe: dict | None, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _layout(
            world,
            _model(**(model or {})),
            MoEConfig(**(moe or {"num_experts": 4, "top_k": 2, "expert_hidden": 32})),
            **parallel,
        )
    assert err.value.key == key
    assert words in str(err.value)


def test_sequence_length_must_split_over_tp_with_sequence_parallel() -> None:
    cfg = ParallelConfig(tp=2)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    with pytest.raises(ConfigError, match="data.seq_len"):
        ParallelLayout.from_config(cfg, 2, _model(), moe, seq_len=31)
    no_sp = ParallelConfig(tp=2, sequence_parallel=False)
    assert ParallelLayout.from_config(no_sp, 2, _model(), moe, seq_len=31).tp == 2


def test_etp_must_be_0_1_or_tp() -> None:
    with pytest.raises(ConfigError) as err:
        ParallelConfig(tp=2, etp=3).validate("parallel")
    assert err.value.key == "parallel.etp"


def test_ddp_is_refused_with_model_parallel_layouts_under_the_native_engine(tmp_path) -> None:
    from framework.config import load_raw, resolve

    job = tmp_path / "job.yaml"
    job.write_text("parallel:\n  data: ddp\n  ep: 2\n")
    with pytest.raises(ConfigError) as err:
        resolve(load_raw(job, []))
    assert err.value.key == "parallel.data" and "use parallel.data=fsdp" in str(err.value)
    job.write_text("parallel:\n  data: fsdp\n  ep: 2\n")
    assert resolve(load_raw(job, [])).parallel.ep == 2
