"""The validation loss of fixed weights does not depend on the data-parallel size, the parallel layout or
``train.seed``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["val_loss"]


def test_same_weights_give_the_same_val_loss_on_one_and_two_ranks_and_any_seed(
    fine_tuned_from_another_run: tuple[Path, Path],
) -> None:
    """The base run (one process, seed 0) and a run that starts from its final weights on two ranks (fsdp, ep=2,
    seed 1) and keeps them (lr 0; conftest.py) score the same weights, each after its last step. A validation set
    that depended on the data-parallel size or the seed would move the loss. Tolerance 1e-6 relative: every
    validation micro-batch is the same forward pass in both runs; only the order of the float64 sum of the per-batch
    fp32 losses and of the experts' weighted sum per token (ep=2 computes them on another rank) differ (measured:
    equal)."""
    base, two_ranks_ep2_other_seed = fine_tuned_from_another_run
    assert _val_loss(two_ranks_ep2_other_seed) == pytest.approx(_val_loss(base), rel=1e-6)
