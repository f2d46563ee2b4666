"""Rank-aware console output and silencing of dependency notices that do not apply."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from framework.parallel import collectives as C


def info(message: str) -> None:
    """Print on rank 0 only."""
    if C.rank() == 0:
        print(message, flush=True)


def warn(message: str, all_ranks: bool = False) -> None:
    """A warning line on rank 0 (or on every rank, prefixed with its rank, when it is rank-specific)."""
    if all_ranks and C.world_size() > 1:
        print(f"[rank {C.rank()}] warning: {message}", file=sys.stderr, flush=True)
    elif C.rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> str:
    """``[rank r] expertrain: error: ...`` under torchrun (before or after the process group exists)."""
    rank = C.rank() if C.is_distributed() else int(os.environ.get("RANK", "0"))
    launched = C.world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    prefix = f"[rank {rank}] " if launched else ""
    return f"{prefix}expertrain: error: {message}"


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
