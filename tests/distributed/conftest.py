"""Fixtures of the distributed tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.layouts import REGISTRY, train_layouts
from tests.distributed.shared_spawn import SHARED, Job, SharedRanks

LAYOUTS_JOB = "layouts"
"""The shared job (``shared_spawn.py``) that trains the registered layouts of its world size."""


@pytest.fixture(scope="session")
def shared_ranks(tmp_path_factory: pytest.TempPathFactory) -> SharedRanks:
    """``shared_ranks(world, name) -> [result of rank 0, 1, ...]`` of a worker function shared with
    :func:`tests.distributed.shared_spawn.share`, or of ``layouts`` (the training of every layout registered for
    ``world``): all of them run in one spawn of ``world`` ranks, the first time any test asks for one."""

    def jobs_of(world: int) -> dict[str, Job]:
        jobs = dict(SHARED.get(world, {}))
        if world in REGISTRY:
            jobs[LAYOUTS_JOB] = (train_layouts, True, (REGISTRY[world],))
        return jobs

    return SharedRanks(lambda world: str(tmp_path_factory.mktemp(f"shared-world{world}")), jobs_of)


@pytest.fixture(scope="session")
def trained_layouts(shared_ranks: SharedRanks) -> Callable[[int], tuple[dict[str, Any], Path]]:
    """``get(world) -> (results by layout name, root folder)``: every layout registered for ``world`` (see
    ``layouts.py``), trained in the shared spawn of ``world`` ranks the first time any test asks for one of its
    jobs. A layout that failed maps to its traceback."""

    def get(world: int) -> tuple[dict[str, Any], Path]:
        results = shared_ranks(world, LAYOUTS_JOB)[0]
        return results, shared_ranks.folder(world, LAYOUTS_JOB)

    return get
