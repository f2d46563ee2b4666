"""Hang detection: a collective that timed out becomes one line naming the rank that stopped responding.

Every collective runs under ``parallel.timeout_s`` (the process group's timeout). When one rank hangs (a deadlock, a
stuck file system, an endless loop in a plugin) the others' next collective raises after that time, but the backend's
message names only a socket address. :func:`explain` turns that error into

    a collective timed out after 10 s at step 3: rank 1 did not respond (hung or dead); ...

in three parts:

* :func:`install` (every rank, right after the process group starts, while every rank still answers) agrees on a
  name space for this run in the process group's key-value store and registers a tiny in-process plugin that
  records the step each rank is in (``expertrain_step_begin``, called before any other plugin's);
* after a failed collective every surviving rank writes ``alive/<rank>`` in that name space and waits a short window
  (:func:`check_window_s`) for the other ranks' keys; the ranks whose key never comes are the hung or dead ones.
  Each survivor reaches the same answer on its own, a late survivor sees the keys written before it, and a dead rank
  is found as well as a hung one. (``monitored_barrier`` names a hung rank too, but raises "Connection closed by
  peer" without a rank when the rank is dead, and exists on gloo only.)
* ``framework/train/launch.py`` prints the line and exits 1; torchrun then stops the hung rank (or, with
  ``--max-restarts``, restarts the job, which resumes from its latest checkpoint).
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from framework.comm import collectives as C
from framework.hooks.markers import hookimpl

PLUGIN_NAME = "expertrain-watchdog"
"""The name of the step-tracking plugin :func:`install` registers (it shows in ``EXPERTRAIN_TRACE_HOOKS`` output)."""


@dataclass
class _Watch:
    timeout_s: float
    namespace: str | None = None  # store keys of this run; None without a process group
    step: int | None = None


_watch: _Watch | None = None


class _StepTracker:
    """Records the step every rank is in, before any other plugin's ``expertrain_step_begin`` runs."""

    @hookimpl(tryfirst=True)
    def expertrain_step_begin(self, step: int) -> None:
        note_step(step)


def install(timeout_s: float, plugins: Any = None) -> None:
    """Prepare hang detection; call on every rank right after the process group starts (one small broadcast).

    ``plugins``: the job's :class:`~framework.hooks.PluginManager`; a tracker that records the current step is
    registered in it (without one, :func:`note_step` is the way to say which step runs).
    """
    global _watch
    namespace = None
    if C.is_distributed():
        # A fresh name per run: torchrun's store outlives a restarted attempt, and with it the old attempt's keys.
        namespace = f"expertrain/watchdog/{C.broadcast_object(secrets.token_hex(8))}"
    _watch = _Watch(timeout_s=float(timeout_s), namespace=namespace)
    if plugins is not None and PLUGIN_NAME not in plugins:
        plugins.register_object(PLUGIN_NAME, _StepTracker())


def note_step(step: int) -> None:
    """The step this rank is in now (the step named when a collective times out)."""
    if _watch is not None:
        _watch.step = step


def current_step() -> int | None:
    return None if _watch is None else _watch.step


def reset() -> None:
    """Forget the installed state (tests; a process that starts a second job)."""
    global _watch
    _watch = None


def check_window_s(timeout_s: float) -> float:
    """How long a survivor waits for the others' keys: a quarter of the timeout, within [2, 30] s."""
    return min(30.0, max(2.0, timeout_s / 4))


# --- after a failure ----------------------------------------------------------------------------------------------


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _lost_peer(exc: BaseException) -> bool:
    return any(re.search(r"connection (closed|reset)|broken pipe", str(e), re.I) for e in _chain(exc))


def _cause(exc: BaseException) -> str:
    if _lost_peer(exc):
        return "lost the connection to a peer"
    seconds = _watch.timeout_s if _watch is not None else None
    if seconds is None:
        found = re.search(r"Timed out waiting (\d+)ms", " ".join(str(e) for e in _chain(exc)))
        seconds = int(found.group(1)) / 1000 if found else None
    return "timed out" + (f" after {seconds:g} s" if seconds is not None else "")


def _rank0_hosts_store() -> bool:
    """Whether rank 0's process serves the store (plain env:// start, or torchrun without its shared agent store)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def missing_ranks(window: float | None = None) -> list[int] | None:
    """The ranks that do not check in within ``window`` seconds (default :func:`check_window_s`); ``[]``: every rank
    did; ``None``: unknown."""
    if _watch is None or _watch.namespace is None:
        return None
    window = check_window_s(_watch.timeout_s) if window is None else window
    rank, world = C.rank(), C.world_size()
    try:
        store = dist.distributed_c10d._get_default_store()  # no public accessor in torch 2.13
        store.set_timeout(datetime.timedelta(seconds=window))
        store.set(f"{_watch.namespace}/alive/{rank}", "1")
        waiting = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + window
        while waiting:
            waiting = [r for r in waiting if not store.check([f"{_watch.namespace}/alive/{r}"])]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return waiting
    except Exception:  # noqa: BLE001 - the store stopped answering
        return [0] if rank != 0 and _rank0_hosts_store() else None


def explain(exc: BaseException) -> str | None:
    """One line for a collective that timed out or lost a peer (``None`` for any other error).

    Runs the check of the module docstring first (at most :func:`check_window_s` seconds, 5 s at most for a lost
    connection); call it once, on the error that ends the job, on every rank.
    """
    if not C.is_collective_failure(exc):
        return None
    step = current_step()
    where = f"at step {step}" if step is not None else "before the first step"
    head = f"a collective {_cause(exc)} {where}"
    limit = f"parallel.timeout_s (now {_watch.timeout_s:g} s)" if _watch is not None else "parallel.timeout_s"
    lost_peer = _lost_peer(exc)
    # A peer whose connection closed is gone, and the survivors notice at once: no need to wait as for a hang.
    missing = missing_ranks(min(5.0, check_window_s(_watch.timeout_s)) if lost_peer and _watch else None)
    if missing:
        who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}"
        if lost_peer:
            return f"{head}: {who} did not respond (it exited or was killed; its own output says why)"
        return (
            f"{head}: {who} did not respond (hung or dead); its output, or `py-spy dump --pid PID` on it, shows "
            f"where it stopped; if it is only slow (a long checkpoint write, a first compile), raise {limit}"
        )
    if missing == []:
        return (
            f"{head}, yet every rank answered a check afterwards: the ranks called different collectives (code that "
            f"runs on some ranks only) or one was slower than {limit}"
        )
    return f"{head}; which rank stopped responding is not known; if a rank is only slow, raise {limit}"
