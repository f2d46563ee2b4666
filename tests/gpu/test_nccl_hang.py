"""A rank that hangs while the others wait in NCCL: the job fails within ``parallel.timeout_s`` (plus the rank check)
with one line naming the rank, as it does over gloo (tests/integration/test_launchers.py).

Over NCCL a timed-out collective is first seen by NCCL's watchdog thread; torch's default there ends the process
before Python sees an error. framework/parallel/setup.py starts NCCL with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``
(abort the communicators, raise in Python), so the error reaches framework/parallel/watchdog.py, which names the rank.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from framework.parallel.watchdog import check_window_s
from tests.gpu.devices import needs_gpus
from tests.integration.launch import run_training
from tests.integration.plugin_site import install_plugin
from tests.integration.test_launchers import HANG_PLUGIN

pytestmark = [pytest.mark.timeout(300), needs_gpus(2)]

TIMEOUT_S = 20
"""Long enough for NCCL's start-up and a first step on any GPU; the hang starts at step 3."""


def test_a_rank_hung_while_peers_wait_in_nccl_is_named_within_the_timeout(tmp_path: Path) -> None:
    site = install_plugin(tmp_path / "site", "hang", HANG_PLUGIN)
    overrides = [
        "train.device=cuda",
        "parallel.data=fsdp",
        "train.steps=6",
        "plugins=[hang]",
        f"parallel.timeout_s={TIMEOUT_S}",
    ]
    # The bound: start-up (~30 s with NCCL), the timeout, the rank check, and the launcher's grace before it stops
    # the hung rank (tests/integration/ranks.py). A job NCCL left hanging overruns it and fails here.
    bound = 60 + TIMEOUT_S + check_window_s(TIMEOUT_S) + 20
    try:
        proc = run_training(tmp_path / "run", overrides, nproc=2, extra_path=[site], timeout=bound)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the job did not fail within {bound:.0f} s:\n{(exc.stderr or b'')[-3000:]!r}"
        ) from exc
    assert proc.returncode != 0
    expected = f"[rank 0] expertrain: error: a collective timed out after {TIMEOUT_S} s at step 3: rank 1 did not respond"
    assert any(expected in line for line in proc.stderr.splitlines()), proc.stderr[-3000:]
