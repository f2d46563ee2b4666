"""Fixtures of the distributed tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.layouts import REGISTRY, train_layouts
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
def sharded_init_four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per rank, the assemblies of test_sharded_init.py (``layouts``) and test_sharded_init_plugins.py
    (``plugin_jobs``), computed in one spawn: 4 ranks start once (~5-10 s on two cores), not once per module."""
    from tests.distributed.test_sharded_init import on_ranks_with_plugin_jobs

    root = str(tmp_path_factory.mktemp("few-experts-dcp"))
    return run_ranks(on_ranks_with_plugin_jobs, 4, root, timeout=300)
