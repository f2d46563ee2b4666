"""Plugins found through entry points drive real training runs; checkpoints export; the CLI lists plugins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from framework.cli import main as cli_main
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


def test_export_native_matches_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from framework.checkpoint.export import load_model
    from framework.config import load_raw, resolve
    from framework.models import Transformer

    run_dir = tmp_path / "run"
    # Trained with tensor and expert parallelism on 4 ranks: the export holds whole, unsharded weights.
    layout = ["parallel.data=fsdp", "parallel.tp=2", "parallel.ep=2"]
    proc = run_training(run_dir, ["train.steps=3", *layout], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "framework.cli", "export", "native", "--checkpoint", str(run_dir), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name

    reference, _, _, path = load_model(run_dir)
    assert path.name == "step_00000003"
    config = resolve(load_raw(out / "config.yaml"))
    rebuilt = Transformer(config.model, config.moe)
    rebuilt.load_state_dict(load_file(out / "model.safetensors"))
    rebuilt.eval()
    ids = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), reference(ids))
    # The trained weights, not a fresh init: they differ from what init_weights gives for the same seed.
    fresh = Transformer(config.model, config.moe)
    fresh.init_weights(config.train.seed)
    assert not torch.equal(fresh.state_dict()["output.weight"], rebuilt.state_dict()["output.weight"])

    # The same tp2 x ep2 checkpoint as a Hugging Face folder (a plain MoE model is a mixtral): transformers gives
    # our logits (fp32, other summation order: 1e-5).
    from transformers import AutoModelForCausalLM

    hf_out = tmp_path / "hf"
    assert cli_main(["export", "hf", "--checkpoint", str(run_dir), "--output", str(hf_out)]) == 0
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_out).eval()(ids).logits
    torch.testing.assert_close(theirs, reference(ids), atol=1e-5, rtol=0)
    # A format no plugin of the job provides: exit 2, naming it, and no output folder left behind.
    capsys.readouterr()
    assert (
        cli_main(["export", "sparse-mask", "--checkpoint", str(run_dir), "--output", str(tmp_path / "x")])
        == 2
    )
    assert "export format 'sparse-mask' is not available" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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
