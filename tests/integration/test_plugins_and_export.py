"""Plugins found through entry points drive real training runs; checkpoints export; the CLI lists plugins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.launch import REPO, run_training
from tests.unit.hooks.test_writing_plugins_doc import install_doc_plugin


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_third_party_gradnoise_plugin_trains_under_torchrun_with_tracing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir,
        ["plugins=[gradnoise]", "gradnoise.eta=0.01", "gradnoise.gamma=0.55"],
        nproc=2,
        env={"EXPERTRAIN_TRACE_HOOKS": "1"},
        launcher="torchrun",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in metrics(run_dir):
        expected = math.sqrt(0.01 / (1 + record["step"] - 1) ** 0.55)
        assert record["gradnoise/sigma"] == pytest.approx(expected)
    for rank in (0, 1):
        assert f"[rank {rank}] hook expertrain_after_backward [gradnoise]" in proc.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["plugins"] == ["gradnoise"] and saved["gradnoise"]["eta"] == 0.01


def test_the_plugin_from_writing_plugins_md_trains(tmp_path: Path) -> None:
    project, _ = install_doc_plugin(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir, ["myplugin.coef=0.001"], nproc=0, config=tmp_path / "job.yaml", extra_path=[project]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run_dir)
    assert all(r["myplugin/coef"] == 0.001 for r in records)
    assert all(r["loss/logit_z"] > 0 for r in records)
    bad = run_training(
        tmp_path / "bad", ["myplugin.cof=1"], nproc=0, config=tmp_path / "job.yaml", extra_path=[project]
    )
    assert bad.returncode == 1 and "'myplugin.cof'" in bad.stderr


def test_cli_lists_plugins_and_which_a_config_enables(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("plugins: [gradnoise]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "framework.cli", "plugins", "--config", str(job)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("gradnoise "))
    assert row.split()[1] == "yes" and "after_backward" in row


def test_bf16_autocast_with_activation_checkpointing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir, ["train.dtype=bf16", "train.activation_checkpointing=true", "train.steps=3"], nproc=0
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run_dir)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    # Exact expert counts even with the recompute in backward: top_k per token per MoE layer.
    assert sum(records[0][f"moe/layer0/tokens_e{e}"] for e in range(4)) == 4 * 32 * 2


def test_torch_compile(tmp_path: Path) -> None:
    """The suite's one torch.compile test (inductor compiles each block's forward and backward once)."""
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir,
        ["train.compile=true", "train.steps=2", "train.sample_tokens=0", "model.n_layers=1"],
        nproc=0,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
