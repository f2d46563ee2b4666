"""A damaged latest checkpoint is reported in one line naming the file, and the run falls back to the newest intact
one (``checkpoint.on_damaged: fallback``), ending with the losses of an undamaged run; with ``fail`` it stops."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.launch import run_training

COMMON = ["train.steps=4", "checkpoint.every=2", "parallel.data=fsdp", "data.val_fraction=0"]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_a_truncated_shard_of_the_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_training(run_dir, COMMON, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = _losses(run_dir)
    shard = sorted((run_dir / "checkpoints" / "step_00000004").glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    refused = run_training(run_dir, [*COMMON, "checkpoint.on_damaged=fail"], nproc=2)
    assert refused.returncode == 1
    assert shard.name in refused.stderr and "Traceback" not in refused.stderr
    # The damage is found in one rank's share of the files: still one whole line per rank, none run together.
    lines = [line for line in refused.stderr.splitlines() if "expertrain: error:" in line]
    assert sorted(line[: line.index("]") + 1] for line in lines) == ["[rank 0]", "[rank 1]"], lines
    assert all(line.startswith("[rank ") and line.count("expertrain:") == 1 for line in lines), lines
    assert all(shard.name in line for line in lines), lines

    resumed = run_training(run_dir, COMMON, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert shard.name in resumed.stderr  # the warning names the damaged file
    assert "at step 2" in resumed.stdout
    got = _losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    assert got[3] == reference[3] and got[4] == reference[4]
