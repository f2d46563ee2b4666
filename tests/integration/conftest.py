"""Fixtures shared by integration test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.launch import run_training


@pytest.fixture(scope="session")
def fine_tuned_from_another_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(base, tuned)`` run folders, one launch each, shared by test_train.py (``model.init_from``) and
    test_validation_set.py (the validation loss of fixed weights):

    - ``base``: one process, seed 0, 2 steps of real training (weights that differ from any fresh init);
    - ``tuned``: ``model.init_from`` the base run on two ranks at fsdp with ep=2, seed 1, one step at lr 0, which
      keeps the weights exactly (AdamW's step and decay are no-ops at lr 0).

    Both evaluate 3 validation micro-batches at the end: on two ranks one rank runs a second, discarded forward
    pass (the uneven case)."""
    root = tmp_path_factory.mktemp("init_from")
    common = ["train.eval_batches=3", "train.sample_tokens=0"]
    base, tuned = root / "base", root / "tuned"
    proc = run_training(base, [*common, "train.steps=2", "train.seed=0"], nproc=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_training(
        tuned,
        [*common, f"model.init_from={base}", "train.steps=1", "optim.lr=0", "train.seed=1"]
        + ["parallel.data=fsdp", "parallel.ep=2"],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model weights from" in proc.stdout
    return base, tuned
