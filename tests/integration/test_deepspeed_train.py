"""``train.engine: deepspeed`` end to end: a native run's checkpoint resumed by a DeepSpeed run (ZeRO-2 with expert
parallelism, two gloo ranks), which continues exactly as the native run did and saves its own.
The numerical comparison of every ZeRO stage lives in tests/distributed/test_deepspeed_engine.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.integration.launch import run_training

os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"
)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_native_checkpoint_resumes_under_deepspeed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["checkpoint.every=2", "logging.tensorboard=false", "logging.plots=false"]
    native = run_training(run_dir, common, nproc=2)
    assert native.returncode == 0, native.stderr[-3000:]
    reference = _losses(run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").unlink()

    # Expert parallel too: each rank keeps 2 of the 4 experts, cut from the checkpoint's full expert weights
    # (parallel.data is unused by DeepSpeed, but its check refuses ddp with ep > 1).
    deepspeed = ["train.engine=deepspeed", "deepspeed.zero_stage=2", "parallel.ep=2", "parallel.data=fsdp"]
    ds = run_training(run_dir, [*common, *deepspeed], nproc=2)
    assert ds.returncode == 0, ds.stderr[-3000:]
    assert "resumed from" in ds.stdout and "step_00000002" in ds.stdout
    resumed = _losses(run_dir)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4), step
    meta = json.loads((checkpoints / "step_00000004" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["step"] == 4
