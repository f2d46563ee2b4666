"""One job per run folder: an exclusive ``flock`` on ``run.dir/.lock`` held for the life of the job.

The kernel drops the lock when the holding process exits, however it exits (SIGKILL included), so a stale lock file
never blocks a restart. The file records who holds it (pid, host, start time) for the message a second job gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another job holds the run folder's lock."""


class RunLock:
    """A held lock on a run folder; :meth:`release` (or leaving a ``with`` block, or exiting) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this process, or raise :class:`RunDirLocked` naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise RunDirLocked(
            f"run folder {run_dir} is in use by another job ({holder}); wait for it to end, stop it, "
            "or give this job another run.dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return RunLock(path, fd)


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "holder unknown: it has not written its name yet"
    return f"pid {record.get('pid')} on {record.get('host', '?')}, started {record.get('started', '?')}"
