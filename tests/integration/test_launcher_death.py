"""A SIGKILLed torchrun cannot stop its workers (they run in sessions of their own): they notice that their launcher
is gone and stop (``framework/train/signals.py``, ``watch_launcher``), so a restart never shares the run folder with
the old job's workers."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from framework.train.signals import EXIT_CODE
from tests.integration.launch import child_pids, run_training, start_training, wait_until

COMMON = ["train.steps=12", "checkpoint.every=4", "data.val_fraction=0", "train.sample_tokens=0"]
STOP_BOUND_S = 30.0  # a step takes well under a second here; the bound leaves room for a loaded machine


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_workers_of_a_killed_torchrun_stop_and_the_restart_resumes_from_their_checkpoint(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, COMMON, nproc=2, launcher="torchrun")
    wait_until(lambda: 2 in _steps(run_dir), [proc], timeout=240)
    workers = child_pids(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the agent only: its workers live on, as after a node agent's OOM kill
    killed_at = time.monotonic()
    proc.wait()
    deadline = killed_at + STOP_BOUND_S
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_in = time.monotonic() - killed_at
    alive = [pid for pid in workers if not _gone(pid)]
    for pid in alive:  # do not leave them running behind the test
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers still running {STOP_BOUND_S:g} s after torchrun was killed"
    # Their output went to the pipe torchrun shared with them: read what they wrote (EOF now that all are gone).
    assert proc.stdout is not None
    out = proc.stdout.read()

    gone_lines = [line for line in out.splitlines() if "expertrain: the launcher (pid" in line]
    # The rank whose watch polls first stops every rank through the agreed stop; a rank that has saved and exited
    # before its own poll prints nothing. So: at least one rank says why, and no rank says it twice.
    named = re.findall(r"\[rank (\d)\]", " ".join(gone_lines))
    assert named and set(named) <= {"0", "1"} and len(named) == len(set(named)), out[-3000:]
    # Rank 0 reports the stop: its own SIGTERM, or the one a peer's watch sent (then "a signal to another rank").
    stop = re.search(
        r"stopped by (?:SIGTERM|a signal to another rank) after step (\d+); checkpoint (step_\d+) saved", out
    )
    assert stop is not None, out[-3000:]
    stopped_at = int(stop.group(1))
    assert 2 <= stopped_at < 12, f"the workers ran on to step {stopped_at}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == stop.group(2)
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a partial save was left behind"
    assert _steps(run_dir) == list(range(1, stopped_at + 1))

    restart = run_training(run_dir, COMMON, nproc=2)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"at step {stopped_at}" in restart.stdout  # resumed from the workers' checkpoint
    assert _steps(run_dir) == list(range(1, 13)), "every step logged once: no second writer"
    print(
        f"workers stopped {stopped_in:.1f} s after torchrun was killed (exit code {EXIT_CODE} expected of each)"
    )
