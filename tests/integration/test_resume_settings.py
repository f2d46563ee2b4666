"""A resumed run applies the job's optimization settings (never a mix of the checkpoint's and the job's) and warns
when a changed key changes the sample order, and a run killed after its final checkpoint but before its report
writes the report on restart. Real one-process runs of the tiny quickstart model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from framework.config import OptimConfig
from framework.train.optim import build_optimizer, build_scheduler
from tests.integration.launch import run_training


def _logged_lrs(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}


def _fresh_schedule_lrs(cfg: OptimConfig, total_steps: int) -> dict[int, float]:
    """The lr a fresh run logs after each of its steps (one scheduler step per optimizer step)."""
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg, [], torch.device("cpu"))
    scheduler = build_scheduler(optimizer, total_steps, cfg)
    lrs = {}
    for step in range(1, total_steps + 1):
        optimizer.step()
        scheduler.step()
        lrs[step] = scheduler.get_last_lr()[0]
    return lrs


SCHEDULE = ["optim.warmup_steps=1", "optim.min_lr_ratio=0.1"]


@pytest.fixture(scope="module")
def resumed_with_other_settings(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """2 steps at lr 1e-3 (seed 0), then the same run folder resumed for 4 steps at lr 3e-3 with seed 1: one resume
    that changes a schedule key, an order-changing key and ``train.steps`` (two launches for the tests below)."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    first = run_training(run_dir, [*SCHEDULE, "optim.lr=1e-3", "train.steps=2"], nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_training(run_dir, [*SCHEDULE, "optim.lr=3e-3", "train.steps=4", "train.seed=1"], nproc=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run_dir, resumed


def test_a_changed_lr_on_resume_gives_the_fresh_schedule_of_the_new_lr(
    resumed_with_other_settings: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, resumed = resumed_with_other_settings
    logged = _logged_lrs(run_dir)
    shape = {"warmup_steps": 1, "min_lr_ratio": 0.1}
    before = _fresh_schedule_lrs(OptimConfig(lr=1e-3, **shape), total_steps=2)
    after = _fresh_schedule_lrs(OptimConfig(lr=3e-3, **shape), total_steps=4)
    # Both sides compute base_lr * the same float factor: equal up to float rounding of the product.
    for step in (1, 2):
        assert abs(logged[step] - before[step]) <= 1e-12, (step, logged[step], before[step])
    for step in (3, 4):
        assert abs(logged[step] - after[step]) <= 1e-12, (step, logged[step], after[step])
    assert (
        "resuming with optim.lr 0.003 (checkpoint 0.001): the schedule continues from step 2"
        in resumed.stdout
    )
    assert "optim.warmup_steps" not in resumed.stdout  # unchanged keys are not reported


def test_changed_sample_order_on_resume_warns(
    resumed_with_other_settings: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, resumed = resumed_with_other_settings
    assert "changed train.seed" in resumed.stderr and "sample order" in resumed.stderr
    # More steps alone keep the order (tests/integration/test_extend_run.py), and the lr does not touch it: neither
    # is named among the changed keys.
    assert "train.steps" not in resumed.stderr and "optim.lr" not in resumed.stderr
    assert "resuming with train.steps 4 (checkpoint 2): the cosine decay is re-fitted" in resumed.stdout
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(r["step"] for r in map(json.loads, lines) if "loss" in r) == [1, 2, 3, 4]


def test_a_finished_run_without_its_report_writes_it_on_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_training(run_dir, ["logging.plots=true"], nproc=0)
    assert done.returncode == 0, done.stderr[-3000:]
    original = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for name in ("summary.json", "loss.png"):  # as if killed right after the final checkpoint
        (run_dir / name).unlink()

    again = run_training(run_dir, ["logging.plots=true"], nproc=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no summary.json: evaluating the final checkpoint" in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == original["steps"] == 4
    assert summary["tokens_seen"] == original["tokens_seen"] > 0
    # The same weights (restored bit for bit) on the same validation batches; 1e-6 relative leaves room for the
    # order of float reductions only.
    assert abs(summary["val_loss"] - original["val_loss"]) <= 1e-6 * original["val_loss"]
    assert (run_dir / "loss.png").is_file()

    complete = run_training(run_dir, [], nproc=0)
    assert complete.returncode == 0 and "is already complete" in complete.stdout
