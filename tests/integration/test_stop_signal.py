"""A scheduler's signal stops the job cleanly (``checkpoint.save_on_signals``, ``framework/train/signals.py``): every
rank finishes the same step, one checkpoint is saved, the job exits with code 75, and rerunning the same command
resumes to the losses of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from framework.checkpoint import CheckpointStore
from framework.train.signals import EXIT_CODE
from tests.integration.launch import child_pids, run_training, start_training, wait_until

COMMON = ["train.steps=8", "parallel.data=fsdp", "data.val_fraction=0", "train.sample_tokens=0"]


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_training(run_dir, COMMON, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(run_dir)


def _signal_after_step_2(proc: subprocess.Popen, run_dir: Path, pid: int, sig: signal.Signals) -> str:
    wait_until(lambda: 2 in _losses(run_dir), [proc], timeout=240)
    os.kill(pid, sig)
    out, _ = proc.communicate(timeout=240)
    return out


def _assert_resumes_exactly(run_dir: Path, stopped_at: int, reference: dict[int, float]) -> None:
    resumed = run_training(run_dir, COMMON, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step in range(stopped_at + 1, 9):
        assert got[step] == reference[step], f"step {step}: {got[step]!r} != {reference[step]!r}"


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(
    tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, COMMON, nproc=2)  # ranks.py: the two ranks are its children
    wait_until(lambda: len(child_pids(proc.pid)) == 2, [proc], timeout=60)
    rank1 = sorted(child_pids(proc.pid))[1]
    out = _signal_after_step_2(proc, run_dir, rank1, signal.SIGUSR1)
    assert proc.returncode == EXIT_CODE, out[-3000:]
    line = next(x for x in out.splitlines() if "expertrain: stopped by" in x)
    # Rank 0 was not signalled: it learned of rank 1's signal through the step's all-reduce.
    assert "a signal to another rank" in line
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert 2 <= stopped_at < 8
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert max(_losses(run_dir)) == stopped_at  # nothing ran past the saved step
    _assert_resumes_exactly(run_dir, stopped_at, reference)


def test_sigterm_to_torchrun_saves_a_verified_checkpoint_of_the_step_it_names(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers, which stop as one signalled rank does. The resume from such a
    checkpoint is the same code whatever sent the signal: the other two tests here rerun theirs to the exact losses
    of the uninterrupted run (a launch less in this one)."""
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, COMMON, nproc=2, launcher="torchrun")
    out = _signal_after_step_2(proc, run_dir, proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers
    line = next((x for x in out.splitlines() if "expertrain: stopped by SIGTERM" in x), None)
    assert line is not None, out[-3000:]
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert CheckpointStore(checkpoints).latest_verified("fail") == checkpoints / f"step_{stopped_at:08d}"
    assert max(_losses(run_dir)) == stopped_at  # nothing ran past the saved step


def test_a_second_signal_during_the_save_changes_nothing(tmp_path: Path, reference: dict[int, float]) -> None:
    """SIGTERM to rank 1, then SIGTERM to both ranks again as soon as the save's temporary folder appears (or at
    once, if the poll misses it): the job still stops with one checkpoint, which verifies, and resumes exactly."""
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, COMMON, nproc=2)
    wait_until(lambda: len(child_pids(proc.pid)) == 2, [proc], timeout=60)
    ranks = sorted(child_pids(proc.pid))
    wait_until(lambda: 2 in _losses(run_dir), [proc], timeout=240)
    os.kill(ranks[1], signal.SIGTERM)
    checkpoints = run_dir / "checkpoints"
    deadline = time.time() + 60
    while proc.poll() is None and not list(checkpoints.glob("step_*.tmp")) and time.time() < deadline:
        time.sleep(0.002)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_CODE, out[-3000:]
    line = next(x for x in out.splitlines() if "expertrain: stopped by SIGTERM" in x)
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert CheckpointStore(checkpoints).latest_verified("fail") == checkpoints / f"step_{stopped_at:08d}"
    assert not list(checkpoints.glob("*.tmp"))
    _assert_resumes_exactly(run_dir, stopped_at, reference)
