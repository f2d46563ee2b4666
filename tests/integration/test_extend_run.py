"""Extending a finished run: resumed with a larger ``train.steps`` it equals a run of that many steps from the
start (same samples, same lr at every step), bit for bit. Real one-process runs of the tiny quickstart model on a
prepared dataset small enough that the runs wrap over several epochs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from framework.checkpoint.stream import CheckpointTensors
from tests.integration.launch import prepare_dataset, run_training


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: model weights, AdamW moments and step counts."""
    tensors = CheckpointTensors(checkpoint, prefix="")
    return tensors.load(tensors.shapes)


def test_a_finished_run_resumed_with_more_steps_equals_the_longer_run_from_the_start(tmp_path: Path) -> None:
    # ~10 samples of 32 tokens per epoch: 8 steps of 4 samples read three epochs, the resume lands inside the second.
    prefix, tokenizer = prepare_dataset(
        tmp_path, "tiny", lambda i: f"def f{i}(x):\n    return x * {i} + {i + 1}\n" * 2, docs=12
    )
    job = [
        f"data.paths=[{prefix}]",
        f"data.tokenizer={tokenizer}",
        "data.val_fraction=0",
        "optim.warmup_steps=2",
        "optim.decay_steps=5",  # a schedule train.steps does not change
    ]
    reference = tmp_path / "eight"
    assert run_training(reference, [*job, "train.steps=8"], nproc=0).returncode == 0

    extended = tmp_path / "three_then_eight"
    first = run_training(extended, [*job, "train.steps=3"], nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_training(extended, [*job, "train.steps=8"], nproc=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "resuming with train.steps 8 (checkpoint 3): the lr schedule does not depend on train.steps"
        in again.stdout
    )
    assert "sample order" not in again.stdout + again.stderr  # no longer an order-changing key

    assert _losses(extended) == _losses(reference)  # exact: the same samples, lrs and arithmetic
    got, want = (
        _all_tensors(extended / "checkpoints" / "step_00000008"),
        _all_tensors(reference / "checkpoints" / "step_00000008"),
    )
    assert got.keys() == want.keys() and any(k.startswith("optim") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
