"""A device the machine does not have stops every rank with one line before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.launch import run_training
from tests.integration.test_bad_input import assert_fails_on_every_rank


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_one_line_on_every_rank(tmp_path: Path) -> None:
    proc = run_training(tmp_path / "run", ["train.device=cuda"], nproc=2, timeout=120)
    assert_fails_on_every_rank(proc, "config key 'train.device': got 'cuda'; no CUDA device is visible")
    assert not (tmp_path / "run").exists(), "nothing is started without the device"
