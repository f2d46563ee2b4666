"""How many GPUs the tests of tests/gpu can use, and the skip for tests that need more."""

from __future__ import annotations

import pytest
import torch


def gpus() -> int:
    """Visible GPUs (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int) -> pytest.MarkDecorator:
    """Skip unless ``n`` GPUs are visible: NCCL runs one rank per GPU, never two on one. Without any GPU the folder's
    conftest skips everything with its own single reason, so this mark stays out of the way there."""
    return pytest.mark.skipif(
        0 < gpus() < n, reason=f"needs {n} GPUs (one NCCL rank per GPU), {gpus()} visible"
    )
