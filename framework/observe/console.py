"""Rank-aware console output and silencing of dependency notices that do not apply."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from types import ModuleType


def _collectives() -> ModuleType | None:
    """The collectives wrapper once torch is loaded; ``None`` before (a job refused by its config never loads torch:
    the rank then comes from torchrun's environment)."""
    if "torch" not in sys.modules:
        return None
    from framework.comm import collectives

    return collectives


def _rank() -> int:
    C = _collectives()
    return C.rank() if C is not None and C.is_distributed() else int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    C = _collectives()
    return C.world_size() if C is not None and C.is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def info(message: str) -> None:
    """Print on rank 0 only."""
    if _rank() == 0:
        print(message, flush=True)


def warn(message: str, all_ranks: bool = False) -> None:
    """A warning line on rank 0 (or on every rank, prefixed with its rank, when it is rank-specific)."""
    if all_ranks and _world_size() > 1:
        _write_line(f"[rank {_rank()}] warning: {message}")
    elif _rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> str:
    """``[rank r] expertrain: error: ...`` under torchrun (before or after the process group exists)."""
    prefix = f"[rank {_rank()}] " if _world_size() > 1 else ""
    return f"{prefix}expertrain: error: {message}"


def print_error(message: str) -> None:
    """Write :func:`error_line` to stderr as one line of its own (:func:`_write_line`)."""
    _write_line(error_line(message))


def _write_line(text: str) -> None:
    """Write ``text`` to stderr in one ``write`` of the whole line, newline included: the ranks of a job share one
    pipe, and ``print`` writes the text and the newline separately, so two ranks' lines could run together on one
    line. One write of up to ``PIPE_BUF`` (4096) bytes to a pipe is never interleaved. A rank other than 0 starts
    with a newline: rank 0's progress bar, which stays mid-line between its updates, may be on that stream."""
    lead = "\n" if _world_size() > 1 and _rank() != 0 else ""
    line = (lead + text + "\n").encode("utf-8", errors="replace")
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line)
    except (AttributeError, OSError, ValueError):  # no real file descriptor (e.g. captured by a test harness)
        sys.stderr.write(line.decode("utf-8"))
        sys.stderr.flush()


# megatron-core is quieted where it is imported (framework/data/_megatron.py).
_NOISY_LOGGERS = ("torch.distributed.checkpoint", "torch.distributed.elastic")


def quiet_dependencies() -> None:
    """Keep notices that do not apply to this run (DCP single-process notes, deprecations of dependencies) off the
    console. megatron-core's Transformer Engine / Apex notices are silenced where it is imported."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*torch.distributed is disabled.*",
        ".*TypedStorage is deprecated.*",
        ".*pkg_resources is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
