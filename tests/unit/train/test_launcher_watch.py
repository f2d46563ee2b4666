"""``watch_launcher``: a worker whose launcher is SIGKILLed gets its stop signal and says why in one line; a process
started by hand (no ``LOCAL_RANK``) watches nothing. Real processes: a launcher process, its worker in a session of
its own (as torchrun starts them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from framework.train.signals import watch_launcher

    def stop(signum, frame):
        print(f"worker got {signal.Signals(signum).name}", flush=True)
        os._exit(7)

    signal.signal(signal.SIGUSR1, stop)
    print(f"watching {watch_launcher(['SIGUSR1'], interval_s=0.05)}", flush=True)
    time.sleep(60)
    """
)

LAUNCHER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    log = open(sys.argv[2], "w")
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "1"}
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, stdout=log, stderr=log,
                              start_new_session=True)
    print(worker.pid, flush=True)
    time.sleep(60)
    """
)


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_a_worker_stops_with_its_signal_when_its_launcher_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, WORKER, str(log)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert launcher.stdout is not None
    worker = int(launcher.stdout.readline())
    deadline = time.monotonic() + 60
    while "watching" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"watching {launcher.pid}" in log.read_text()  # the worker's parent is its launcher

    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _gone(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker did not stop within 10 s of its launcher's death")
    lines = log.read_text().splitlines()
    assert (
        f"[rank 1] expertrain: the launcher (pid {launcher.pid}) is gone: stopping this worker (SIGUSR1)"
        in lines
    )
    assert (
        lines[-1] == "worker got SIGUSR1"
    )  # the configured stop signal, which the trainer turns into a save


def test_a_process_started_by_hand_watches_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    env["PYTHONPATH"] = str(REPO)
    code = "from framework.train.signals import watch_launcher; print(watch_launcher(['SIGTERM']))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
