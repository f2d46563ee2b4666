"""``model.init_from``: weights from another run's checkpoint, and one clear line when they do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointStore
from framework.checkpoint.warm_start import load_model_weights
from framework.config import ConfigError


def _net(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, hidden), torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 3)
    )
    net.register_buffer("bias_E", torch.randn(4))  # persistent buffers (e.g. expert bias) come along
    return net


def _saved(run_dir: Path, net: torch.nn.Module) -> Path:
    state = {"model": dict(net.state_dict()), "optim": {"lr": torch.tensor(1.0)}}
    return CheckpointStore(run_dir / "checkpoints").save(3, state, {}, {"cpu": torch.get_rng_state()})


def test_weights_come_from_the_latest_checkpoint_of_a_run(tmp_path: Path) -> None:
    source = _net(5, seed=0)
    _saved(tmp_path / "run", source)
    target = _net(5, seed=1)
    assert not torch.equal(target[0].weight, source[0].weight)
    assert load_model_weights(tmp_path / "run", target).name == "step_00000003"
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_a_shape_or_name_that_does_not_fit_is_one_config_error(tmp_path: Path) -> None:
    path = _saved(tmp_path / "run", _net(5, seed=0))
    with pytest.raises(
        ConfigError, match=r"model.init_from.*'0.weight' has shape \(5, 6\) in the checkpoint and \(7, 6\)"
    ):
        load_model_weights(path, _net(7, seed=0))
    bigger = _net(5, seed=0)
    bigger.add_module("3", torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"the checkpoint has no tensor '3.weight'"):
        load_model_weights(path, bigger)
    with pytest.raises(ConfigError, match=r"model.init_from.*no complete checkpoint"):
        load_model_weights(tmp_path / "nowhere", _net(5, seed=0))
