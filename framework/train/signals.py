"""Stopping cleanly on a scheduler's signal: SLURM and most schedulers send SIGTERM (or a chosen signal such as
SIGUSR1 ahead of the time limit), wait, then SIGKILL.

A handler only records that a signal arrived. The trainer folds that flag into the token count it all-reduces at the
start of every step, so all ranks learn in the same step that any rank was signalled; they finish that step, save a
checkpoint and stop with :class:`StopRequested` (exit code :data:`EXIT_CODE`). A second signal during the save
changes nothing: the flag is already set, and the save is atomic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from framework.config import ConfigError

EXIT_CODE = 75
"""``EX_TEMPFAIL``: stopped on request with a checkpoint saved; rerunning the same command resumes."""

KEY = "checkpoint.save_on_signals"


class StopRequested(Exception):
    """Every rank stopped after a signal; the run's state is in the checkpoint of ``step``."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} saved: rerun the same command to "
            "resume"
        )
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


def signal_numbers(names: Sequence[str]) -> list[signal.Signals]:
    """The signals named in ``checkpoint.save_on_signals`` (``SIGTERM`` or ``TERM``); one line naming a bad name."""
    out = []
    for name in names:
        full = name if name.upper().startswith("SIG") else f"SIG{name}"
        try:
            out.append(signal.Signals[full.upper()])
        except KeyError:
            raise ConfigError(KEY, name, "expected signal names such as SIGTERM or SIGUSR1") from None
        if out[-1] in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(KEY, name, "SIGKILL and SIGSTOP cannot be caught; use SIGTERM or SIGUSR1")
    return out


LAUNCHER_POLL_S = 0.5
"""How often a worker checks that its launcher is still its parent."""

_launcher_watch: threading.Thread | None = None


def launcher_pid() -> int | None:
    """The pid of the launcher that started this worker (torchrun's agent, or any launcher that sets ``LOCAL_RANK``
    for its workers), or ``None`` for a process started by hand (its parent is a shell: no watch)."""
    return os.getppid() if "LOCAL_RANK" in os.environ else None


def watch_launcher(names: Sequence[str], interval_s: float = LAUNCHER_POLL_S) -> int | None:
    """Stop this worker when its launcher dies; returns the launcher's pid (``None``: nothing to watch).

    A SIGKILLed torchrun agent cannot stop its workers, which run in sessions of their own: they would go on to finish
    the job, and a restart would then have two jobs writing one run folder. A daemon thread checks every
    ``interval_s`` whether the launcher is still this process's parent; once it is not (the worker was reparented),
    it prints one line and sends this process the first of ``checkpoint.save_on_signals`` (``names``), else SIGTERM.
    In the training loop that is a clean stop (every rank notices, finishes the step, saves, exits with
    :data:`EXIT_CODE`; a rank hung in a collective exits after the grace time); before or after it the signal's
    default action ends the process. Either way the run folder's lock goes with the process and only complete
    checkpoints are ever visible. Polling ``getppid`` rather than ``PR_SET_PDEATHSIG``: the latter fires when the
    launcher *thread* that forked the worker ends, which need not be the launcher's end. Started once per process.
    """
    global _launcher_watch
    parent = launcher_pid()
    if parent is None or _launcher_watch is not None:
        return parent
    sig = signal_numbers(names)[0] if names else signal.SIGTERM
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        lead = "\n" if rank != "0" else ""  # off rank 0's progress bar line, as console's error lines
        line = f"{lead}[rank {rank}] expertrain: the launcher (pid {parent}) is gone: stopping this worker ({sig.name})\n"
        with contextlib.suppress(OSError):  # stderr may have been a pipe to the dead launcher
            os.write(2, line.encode())
        os.kill(os.getpid(), sig)

    _launcher_watch = threading.Thread(target=watch, name="expertrain-launcher-watch", daemon=True)
    _launcher_watch.start()
    return parent


class StopSignals:
    """Records the first of ``names`` this process receives while installed (a context manager).

    A process that does not stop within ``grace_s`` of the signal (it is hung: in a collective whose peer died, in a
    plugin) gets the signal's default action after all, so a launcher's SIGTERM still ends it (torchrun sends SIGTERM
    to the surviving workers when one fails, and SIGKILL only 30 s later)."""

    def __init__(self, names: Sequence[str], grace_s: float) -> None:
        self.signals = signal_numbers(names)
        self.grace_s = grace_s
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._timer: threading.Timer | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            self._timer = threading.Timer(self.grace_s, self._default_action, args=(self.received,))
            self._timer.daemon = True
            self._timer.start()

    def _default_action(self, sig: signal.Signals) -> None:
        # A timer thread may not change signal handlers, and a main thread stuck in a collective would not run a
        # Python handler anyway: end the process here, with the exit status a death by ``sig`` gives.
        message = f"expertrain: did not stop within {self.grace_s:g} s of {sig.name} (hung?): exiting\n"
        os.write(2, message.encode())
        os._exit(128 + int(sig))

    @property
    def pending(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: a job run from a thread keeps defaults
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
