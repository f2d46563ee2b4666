"""End-to-end training jobs: two gloo ranks (torchrun for the first test, tests/integration/ranks.py for the rest)
and plain single processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from framework.checkpoint import CheckpointStore
from tests.integration.launch import kill_when, prepare_dataset, run_training, start_training


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_two_rank_run_writes_metrics_plots_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir, ["logging.tensorboard=true", "logging.plots=true"], nproc=2, launcher="torchrun"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "val_loss" in records[-1] and all(r["loss"] > 0 for r in records)
    # Exact routing counts: every token of the global batch picks top_k experts in each MoE layer.
    tokens_per_step = 4 * 32
    for layer in (0, 1):
        routed = sum(records[0][f"moe/layer{layer}/tokens_e{e}"] for e in range(4))
        assert routed == tokens_per_step * 2
    for name in ("loss.png", "expert_load.png", "config.yaml", "summary.json", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").iterdir()), "no TensorBoard events"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 4 and saved["model"]["dim"] == 32
    assert "validation loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert proc.stdout.count("validation loss") == 1, "only rank 0 prints the summary"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["gap_below_unigram"] == pytest.approx(
        summary["unigram_entropy"] - summary["val_loss"]
    )
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"

    again = run_training(
        run_dir, ["logging.tensorboard=true", "logging.plots=true"], nproc=2, launcher="torchrun"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stdout
    assert len(metrics(run_dir)) == 4


def test_kills_during_and_after_checkpoint_saves_resume_bit_identical(tmp_path: Path) -> None:
    """Two ranks (FSDP-sharded state), SIGKILLed three times: while step 10's shards are being written, around the
    rename of step 15 and right after ``latest`` named step 20; every restart resumes from an intact
    checkpoint and the losses of all 25 steps equal the uninterrupted run's."""
    common = [
        "train.steps=25",
        "checkpoint.every=5",
        "train.eval_every=15",
        "train.eval_batches=30",
        "parallel.data=fsdp",  # sharded state: the harder case for an exact resume
    ]
    reference = run_training(tmp_path / "ref", common, nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"

    def latest_is(name: str) -> bool:
        return (checkpoints / "latest").is_file() and (checkpoints / "latest").read_text() == name

    kill_points = [
        # (kill condition, the steps the restart may resume from)
        (lambda: (checkpoints / "step_00000010.tmp").is_dir() or (checkpoints / "step_00000010").is_dir(), {5, 10}),
        (lambda: (checkpoints / "step_00000015.tmp" / "manifest.json").is_file() or latest_is("step_00000015"), {10, 15}),
        (lambda: latest_is("step_00000020"), {20}),
    ]  # fmt: skip
    for condition, allowed in kill_points:
        proc = start_training(run_dir, common, nproc=2)
        assert kill_when(proc, condition, poll=0.002), "the run finished before it could be killed"
        resume_from = CheckpointStore(checkpoints).latest_verified(
            "fail"
        )  # a kill never damages what is visible
        assert resume_from is not None
        assert CheckpointStore.read_meta(resume_from)["step"] in allowed, resume_from

    resumed = run_training(run_dir, common, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    ref, got = losses(tmp_path / "ref"), losses(run_dir)
    assert sorted(got) == list(range(1, 26))
    for step in range(1, 26):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"


def test_training_on_a_blend_of_prepared_datasets(tmp_path: Path) -> None:
    defs, _ = prepare_dataset(tmp_path, "defs", lambda i: f"def f{i}(x):\n    return x * {i}\n" * 30)
    classes, _ = prepare_dataset(tmp_path, "classes", lambda i: f"class C{i}:\n    value = {i}\n" * 30)
    run_dir = tmp_path / "run"
    proc = run_training(run_dir, [f"data.paths=[{defs}, {classes}]", "data.weights=[0.7, 0.3]"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[-1]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["weights"] == [0.7, 0.3]


def test_no_validation_split_still_logs_the_last_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir,
        ["data.val_fraction=0", "logging.log_every=5", "train.steps=3", "logging.plots=true"],
        nproc=0,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [3] and "val_loss" not in records[0]
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] is None
    assert (run_dir / "loss.png").is_file()


def test_init_from_starts_from_another_runs_weights_in_any_layout(
    fine_tuned_from_another_run: tuple[Path, Path],
) -> None:
    """A one-process run's weights, loaded by ``model.init_from`` into a two-rank fsdp + ep=2 job that trains at
    lr 0 (conftest.py): its final weights are the base run's, bit for bit."""
    from framework.checkpoint.export import load_model

    base, tuned = fine_tuned_from_another_run
    want, got = load_model(base)[0].state_dict(), load_model(tuned)[0].state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
