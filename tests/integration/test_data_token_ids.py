"""A prepared dataset whose ids exceed the model's vocabulary stops a real 2-rank run before training with one
error line naming the file, the largest id and the vocabulary size (on GPU the embedding lookup would be a
device-side assert)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from framework.data.indexed import validate_indexed
from tests.integration.launch import prepare_dataset, run_training


def test_ids_past_the_models_vocabulary_stop_the_run_before_training(tmp_path: Path) -> None:
    prefix, _ = prepare_dataset(tmp_path, "code", lambda i: f"def f{i}(x):\n    return x * {i}\n" * 20)
    ids = np.memmap(str(prefix) + ".bin", dtype=validate_indexed(prefix).dtype, mode="r+")
    ids[5] = 9000  # the quickstart model has 8192 ids
    ids.flush()
    del ids
    run_dir = tmp_path / "run"
    proc = run_training(run_dir, [f"data.paths=[{prefix}]", "model.vocab_size=8192"], nproc=2)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = f"'{prefix}.bin' holds token id 9000, but the vocabulary has 8192 ids"
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "metrics.jsonl").exists()  # stopped before the first step
