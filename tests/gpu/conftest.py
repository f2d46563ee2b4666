"""tests/gpu: the CUDA paths, run by ``make test-gpu`` on a machine with a GPU (docs/gpu.md).

Without CUDA every test here is skipped with one reason. The folder imports on any machine (``make test`` collects
it), and nothing here touches CUDA before a test runs.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
import torch

from framework.parallel.setup import CUBLAS_DETERMINISTIC_WORKSPACE, CUBLAS_WORKSPACE_ENV

NO_GPU = "no CUDA device visible: tests/gpu runs on a GPU machine (make test-gpu, docs/gpu.md)"

# cuBLAS reads its workspace size when a process first uses it; the deterministic tests need the fixed one, and the
# spawned ranks inherit it from here. It changes no result of the other tests.
os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_DETERMINISTIC_WORKSPACE)


def _skip_without_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)


_SKIP_LINE = _skip_without_cuda.__code__.co_firstlineno  # 0-based in a report: the line below the def


@pytest.fixture(scope="session", autouse=True)
def _needs_cuda() -> None:
    _skip_without_cuda()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Every no-GPU skip reported at this file, so ``pytest -rs`` prints one line for the folder, not one per test."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and NO_GPU in report.longrepr[2]:
        report.longrepr = (__file__, _SKIP_LINE, report.longrepr[2])
    return report
