"""The run folder lock: a second process is refused in one line naming the holder; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.checkpoint.lock import LOCK_FILE, RunDirLocked, acquire_run_lock

REPO = Path(__file__).resolve().parents[3]

HOLD = """
import sys, time
from framework.checkpoint.lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    try:
        with pytest.raises(RunDirLocked) as caught:
            acquire_run_lock(run_dir)
        message = str(caught.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and str(run_dir) in message
        assert "started " + time.strftime("%Y-%m-%d") in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock; its record in the file does not block anyone.
    with acquire_run_lock(run_dir) as lock:
        assert lock.held and f'"pid": {os.getpid()}' in (run_dir / LOCK_FILE).read_text()
    assert not lock.held


def test_a_released_lock_can_be_taken_again_in_the_same_process(tmp_path: Path) -> None:
    first = acquire_run_lock(tmp_path)
    with pytest.raises(RunDirLocked):
        acquire_run_lock(
            tmp_path
        )  # flock locks are per open file: even this process's second open is refused
    first.release()
    acquire_run_lock(tmp_path).release()
