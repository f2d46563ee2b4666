"""The validation loss of fixed weights does not depend on the data-parallel size or on ``train.seed``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.launch import run_training

# Three validation micro-batches: on two ranks one rank runs a second, discarded forward pass (the uneven case).
EVAL = ["optim.lr=0", "train.steps=1", "train.eval_batches=3", "train.sample_tokens=0"]


def _val_loss(run_dir: Path, overrides: list[str], nproc: int) -> float:
    proc = run_training(run_dir, overrides, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())["val_loss"]


def test_same_weights_give_the_same_val_loss_on_one_and_two_ranks_and_any_seed(tmp_path: Path) -> None:
    """lr=0 keeps the weights (AdamW's step and decay are exact no-ops), so every run scores the base run's initial
    weights. Tolerance 1e-6 relative: every micro-batch is the same forward pass in every run; only the order of
    the float64 sum of the per-batch fp32 losses differs. One run changes both the data-parallel size and the seed
    (a launch less): a validation set that depended on either would move its loss."""
    base = tmp_path / "base"
    reference = _val_loss(base, [*EVAL, "train.seed=0"], nproc=0)
    two_ranks_fsdp_other_seed = _val_loss(
        tmp_path / "two", [*EVAL, f"model.init_from={base}", "parallel.data=fsdp", "train.seed=1"], nproc=2
    )
    assert two_ranks_fsdp_other_seed == pytest.approx(reference, rel=1e-6)
