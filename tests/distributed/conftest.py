"""Fixtures of the distributed tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.layouts import REGISTRY, train_layouts
from tests.distributed.shared_spawn import SHARED, run_shared
from tests.distributed.spawn import run_ranks


@pytest.fixture(scope="session")
def trained_layouts(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], tuple[dict[str, Any], Path]]:
    """``get(world) -> (results by layout name, root folder)``: every layout registered for ``world`` (see
    ``layouts.py``), trained in one spawn the first time any test asks. A layout that failed maps to its traceback."""
    cache: dict[int, tuple[dict[str, Any], Path]] = {}

    def get(world: int) -> tuple[dict[str, Any], Path]:
        if world not in cache:
            root = tmp_path_factory.mktemp(f"layouts-world{world}")
            results = run_ranks(train_layouts, world, str(root), REGISTRY[world], timeout=900)[0]
            cache[world] = (results, root)
        return cache[world]

    return get


@pytest.fixture(scope="session")
def shared_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, str], list[Any]]:
    """``get(world, name) -> [result of rank 0, 1, ...]`` of a worker function shared with
    :func:`tests.distributed.shared_spawn.share`: every worker shared for ``world`` runs in one spawn, the first
    time any test asks (a failed spawn is raised again to every test that asks, not rerun)."""
    cache: dict[int, list[dict[str, Any]] | BaseException] = {}

    def get(world: int, name: str) -> list[Any]:
        if world not in cache:
            root = str(tmp_path_factory.mktemp(f"shared-world{world}"))
            try:
                cache[world] = run_ranks(run_shared, world, root, SHARED[world], timeout=600)
            except BaseException as exc:  # noqa: BLE001 - kept for the other tests that ask
                cache[world] = exc
        results = cache[world]
        if isinstance(results, BaseException):
            raise results
        return [rank[name] for rank in results]

    return get
