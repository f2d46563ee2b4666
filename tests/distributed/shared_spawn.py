"""Worker functions of several test modules run on the same spawned ranks: one start-up of N ranks (torch imports,
the process group; ~5 s for two ranks, ~10 s for four on two cores) serves them all instead of one per module.

A module calls :func:`share` at import (pytest imports every module before running any test); the session fixture
``shared_ranks`` (``conftest.py``) runs every function shared for a world size, and the training of every layout
registered for it (``layouts.py``), in one spawn the first time a test asks for one of them (each on the same
process group, in turn) and hands back that function's result per rank. A function that raises fails the spawn
with its traceback, as :func:`~tests.distributed.spawn.run_ranks` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.distributed.spawn import run_ranks

Worker = Callable[..., Any]
"""``fn(rank, world, *args)``, or ``fn(rank, world, folder, *args)`` when shared with ``needs_folder=True``."""

Job = tuple[Worker, bool, tuple[Any, ...]]
"""``(worker, whether it gets a folder of its own, its further arguments)``."""

SHARED: dict[int, dict[str, Job]] = {}
"""``{world size: {name: job}}``."""


def share(world: int, name: str, fn: Worker, *args: Any, needs_folder: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` on the shared ``world``-rank spawn; ``needs_folder``: it also gets an empty
    folder of its own (the same path on every rank) before ``args``."""
    group = SHARED.setdefault(world, {})
    if name in group and group[name][0] is not fn:
        raise ValueError(f"shared worker {name!r} (world {world}) is registered twice")
    group[name] = (fn, needs_folder, args)


def folder_of(root: str, name: str) -> Path:
    """The folder a job named ``name`` gets under the spawn's ``root``."""
    return Path(root) / name.replace("/", "-")


class SharedRanks:
    """``shared(world, name) -> [result of rank 0, 1, ...]``: the first call for a world size runs ``jobs_of(world)``
    in one spawn of ``world`` ranks under a fresh ``make_root(world)`` folder; a failed spawn is raised again to every
    later call for that world size, not rerun."""

    def __init__(self, make_root: Callable[[int], str], jobs_of: Callable[[int], dict[str, Job]]) -> None:
        self._make_root, self._jobs_of = make_root, jobs_of
        self._roots: dict[int, str] = {}
        self._results: dict[int, list[dict[str, Any]] | BaseException] = {}

    def __call__(self, world: int, name: str) -> list[Any]:
        if world not in self._results:
            self._roots[world] = self._make_root(world)
            try:
                self._results[world] = run_ranks(
                    run_shared, world, self._roots[world], self._jobs_of(world), timeout=900
                )
            except BaseException as exc:  # noqa: BLE001 - kept for the other tests that ask
                self._results[world] = exc
        results = self._results[world]
        if isinstance(results, BaseException):
            raise results
        return [rank[name] for rank in results]

    def folder(self, world: int, name: str) -> Path:
        """The folder the job ``name`` got (after a call for ``world``)."""
        return folder_of(self._roots[world], name)


def run_shared(rank: int, world: int, root: str, jobs: dict[str, Job]) -> dict[str, Any]:
    """Every job's result on this rank, the jobs run in turn."""
    import torch
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for name, (fn, needs_folder, args) in jobs.items():
        torch.set_num_threads(1)  # as a fresh rank starts (a job may have changed it)
        if needs_folder:
            folder = folder_of(root, name)
            if rank == 0:
                folder.mkdir(parents=True)
            dist.barrier()
            out[name] = fn(rank, world, str(folder), *args)
        else:
            out[name] = fn(rank, world, *args)
    return out
