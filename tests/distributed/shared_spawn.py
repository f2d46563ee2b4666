"""Worker functions of several test modules run on the same spawned ranks: one start-up of N ranks (torch imports,
the process group; ~5 s for two ranks, ~10 s for four on two cores) serves them all instead of one per module.

A module calls :func:`share` at import (pytest imports every module before running any test); the session fixture
``shared_ranks`` (``conftest.py``) runs every function shared for a world size in one spawn the first time a test
asks for one of them (each on the same process group, in turn) and hands back that function's result per rank. A
function that raises fails the spawn with its traceback, as :func:`~tests.distributed.spawn.run_ranks` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Worker = Callable[..., Any]
"""``fn(rank, world)``, or ``fn(rank, world, folder)`` when shared with ``needs_folder=True``."""

SHARED: dict[int, dict[str, tuple[Worker, bool]]] = {}
"""``{world size: {name: (worker, whether it gets a folder of its own)}}``."""


def share(world: int, name: str, fn: Worker, needs_folder: bool = False) -> None:
    """Run ``fn`` on the shared ``world``-rank spawn; ``needs_folder``: it also gets an empty folder of its own (the
    same path on every rank)."""
    group = SHARED.setdefault(world, {})
    if name in group and group[name][0] is not fn:
        raise ValueError(f"shared worker {name!r} (world {world}) is registered twice")
    group[name] = (fn, needs_folder)


def run_shared(rank: int, world: int, root: str, jobs: dict[str, tuple[Worker, bool]]) -> dict[str, Any]:
    """Every job's result on this rank, the jobs run in turn."""
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for name, (fn, needs_folder) in jobs.items():
        torch.set_num_threads(1)  # as a fresh rank starts (a job may have changed it)
        if needs_folder:
            folder = Path(root) / name.replace("/", "-")
            if rank == 0:
                folder.mkdir(parents=True)
            dist.barrier()
            out[name] = fn(rank, world, str(folder))
        else:
            out[name] = fn(rank, world)
    return out
