"""Which device each rank trains on, and the one-line refusals, without a GPU: the visible-GPU count and the launch
environment are arguments of :func:`pick_device` / :meth:`LaunchEnv.read`, so every branch runs on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from framework.config.errors import ConfigError
from framework.parallel.setup import (
    CUBLAS_DETERMINISTIC_WORKSPACE,
    CUBLAS_WORKSPACE_ENV,
    LaunchEnv,
    init_distributed,
    pick_device,
    set_deterministic,
)


def test_cpu_is_cpu_whatever_gpus_are_visible() -> None:
    assert pick_device("cpu", 0, visible_gpus=8) == torch.device("cpu")
    assert pick_device("cpu", 3, local_world_size=4, visible_gpus=0) == torch.device("cpu")


def test_auto_without_a_gpu_trains_on_cpu() -> None:
    assert pick_device("auto", 1, local_world_size=2, visible_gpus=0) == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_line_naming_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        pick_device("cuda", 0, visible_gpus=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config key 'train.device': got 'cuda'")
    assert "no CUDA device is visible" in message and "train.device=cpu" in message


@pytest.mark.parametrize("choice", ["auto", "cuda"])
def test_each_local_rank_gets_its_own_gpu(choice: str) -> None:
    devices = [pick_device(choice, r, local_world_size=4, visible_gpus=4) for r in range(4)]
    assert devices == [torch.device("cuda", r) for r in range(4)]
    # Fewer ranks than GPUs is fine: the ranks take the first ones.
    assert pick_device(choice, 1, local_world_size=2, visible_gpus=8) == torch.device("cuda", 1)


@pytest.mark.parametrize("choice", ["auto", "cuda"])
def test_more_local_ranks_than_gpus_is_refused_naming_both_numbers_and_the_fix(choice: str) -> None:
    with pytest.raises(ConfigError) as info:
        pick_device(choice, 1, local_world_size=2, visible_gpus=1)
    message = str(info.value)
    assert "\n" not in message
    assert "2 ranks on this machine but 1 visible GPU(s)" in message
    assert "--nproc_per_node <= 1" in message and "train.device=cpu" in message


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected one of auto, cpu, cuda"):
        pick_device("tpu", 0, visible_gpus=0)


def test_pick_device_counts_the_visible_gpus_itself_by_default() -> None:
    expected = torch.device("cuda", 0) if torch.cuda.device_count() else torch.device("cpu")
    assert pick_device("auto", 0) == expected


def test_launch_env_reads_torchrun_variables() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert LaunchEnv.read(env) == LaunchEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)


def test_launch_env_of_a_plain_process_is_one_rank() -> None:
    assert LaunchEnv.read({}) == LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)


def test_launch_env_without_local_world_size_counts_every_rank_as_local() -> None:
    """The GPU check then errs on the side of refusing rather than putting two ranks on one GPU."""
    assert LaunchEnv.read({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}).local_world_size == 2


@pytest.fixture
def restore_determinism(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Set, then delete: monkeypatch records the variable either way and restores it (unset) after the test.
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, "")
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_switches_torch_deterministic_algorithms_on() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    set_deterministic(True, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    assert CUBLAS_WORKSPACE_ENV not in os.environ, "the cuBLAS variable is for CUDA only"


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_on_cuda_sets_the_cublas_workspace_before_any_cuda_work() -> None:
    set_deterministic(True, torch.device("cuda", 0))  # sets state only: no CUDA call is made
    assert os.environ[CUBLAS_WORKSPACE_ENV] == CUBLAS_DETERMINISTIC_WORKSPACE
    assert torch.are_deterministic_algorithms_enabled()


@pytest.mark.usefixtures("restore_determinism")
def test_deterministic_off_leaves_torch_as_it_is() -> None:
    set_deterministic(False, torch.device("cuda", 0))
    assert not torch.are_deterministic_algorithms_enabled()
    assert CUBLAS_WORKSPACE_ENV not in os.environ


@pytest.mark.usefixtures("restore_determinism")
def test_start_up_with_train_deterministic_leaves_deterministic_algorithms_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu", timeout_s=60, deterministic=True)
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
