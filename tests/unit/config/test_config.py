"""Config typing, overrides and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from framework.config import ConfigError, check_world, load_raw, resolve
from framework.config.docs import render_config_reference

REPO = Path(__file__).resolve().parents[3]


def job(*overrides: str, path: str | None = None):
    return resolve(load_raw(path, list(overrides)))


def test_defaults_and_typed_overrides() -> None:
    cfg = job("train.steps=7", "optim.lr=1e-4", "data.paths=[a, b]", "model.tie_embeddings=true")
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.paths == ["a", "b"]
    assert cfg.model.tie_embeddings is True


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert job("optim.lr=1").optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'train.steps': got 1.5; expected an integer >= 1"):
        job("train.steps=1.5")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.stepz=3", r"'train.stepz'.*unknown key; 'train' accepts: .*steps"),
        ("train.steps=abc", r"'train.steps': got 'abc'; expected an integer"),
        ("train.steps=0", r"expected an integer >= 1"),
        ("train.dtype=fp16", r"expected one of 'fp32', 'bf16'"),
        ("moe.top_k=9", r"'moe.top_k': got 9; expected at most num_experts=8"),
        ("model.n_kv_heads=3", r"'model.n_kv_heads': got 3; expected a divisor of n_heads=8"),
        ("data.paths=[a, b", r"'data.paths'.*lists are written \[a, b, c\]"),
        ("lora.r=8", r"'lora'.*unknown section.*listed in 'plugins'"),
        ("train.steps", r"expected --set section.key=value"),
        ("data.seq_len=4096", r"'data.seq_len': got 4096; expected at most model.max_seq_len=256"),
        (
            "train.micro_batch_size=5",
            r"'train.global_batch_size': got 16; expected a multiple of train.micro_batch_size=5",
        ),
        ("optim.beta2=1.5", r"'optim.beta2': got 1.5; expected a number >= 0.0 and <= 1.0"),
        ("plugins=lora", r"'plugins': got 'lora'; expected a list"),
    ],
)
def test_bad_values_name_key_value_and_what_is_accepted(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        job(override)
    assert "\n" not in str(info.value)


def test_world_size_the_batch_cannot_use() -> None:
    cfg = job("train.global_batch_size=12", "train.micro_batch_size=2")
    assert check_world(cfg, 2) == 3
    with pytest.raises(
        ConfigError, match=r"multiple of data-parallel ranks \(4\) x train.micro_batch_size \(2\) = 8"
    ):
        check_world(cfg, 4)


def test_job_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected an existing YAML job file"):
        job(path=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="expected valid YAML"):
        job(path=str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  steps: 3\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="'train.bogus'"):
        job(path=str(nested))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "train:\n  steps: 3\n  lr: [1, 2\nmodel:\n  dim: 4\n",
            "line 4, column 6: expected ',' or ']', but got ':'",
        ),
        ("train:\n  steps: 3\n   x: 1\n", "line 3, column 5: mapping values are not allowed here"),
        ("model:\n  dim: 4\n\ttrain: 1\n", "line 3, column 1: found character '\\t'"),
    ],
    ids=["unclosed list", "bad indent", "tab"],
)
def test_yaml_errors_name_the_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    """The line and column are the 1-based position an editor shows for the offending character."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as caught:
        job(path=str(bad))
    assert f"expected valid YAML ({where}" in str(caught.value) and "\n" not in str(caught.value)


def test_every_example_config_resolves() -> None:
    configs = sorted((REPO / "examples" / "configs").glob("*.yaml"))
    assert configs, "no example configs"
    for path in configs:
        raw = load_raw(str(path))
        if raw.get("plugins"):
            continue  # plugin configs are resolved by the training tests, which load their plugins
        cfg = resolve(raw, source=str(path))
        assert cfg.name == path.stem
        assert cfg.run_dir == Path("runs") / path.stem


def test_config_reference_is_generated_from_the_code() -> None:
    expected = render_config_reference()
    doc = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert doc == expected, "docs/config.md is stale: run `expertrain config-docs --output docs/config.md`"
    assert "`train.global_batch_size`" in doc and "`moe.bias_update_rate`" in doc
