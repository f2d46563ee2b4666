"""The example third-party package ``expertrain-gradnoise`` (examples/third_party_plugin), installed like any other.

``make .venv`` installs it (``pip install -e examples/third_party_plugin --no-deps``).
"""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

from framework.config import ConfigError
from framework.hooks import PluginManager, describe_plugins, installed_plugins
from tests.unit.hooks.support import TinyModel, job


@pytest.fixture(scope="module", autouse=True)
def _installed():
    try:
        importlib.metadata.distribution("expertrain-gradnoise")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "expertrain-gradnoise is not installed: run `pip install -e examples/third_party_plugin --no-deps` "
            "(make .venv does it)"
        )


@pytest.fixture
def pm() -> PluginManager:
    pm = PluginManager()
    pm.load(["gradnoise"])
    return pm


def test_discovered_through_its_entry_point(pm):
    assert installed_plugins()["gradnoise"] == "expertrain_gradnoise.plugin"
    assert pm.plugin_names == ["gradnoise"]
    assert pm.hooks_implemented("gradnoise") == [
        "expertrain_config_sections",
        "expertrain_after_backward",
        "expertrain_metrics",
        "expertrain_state_dict",
        "expertrain_load_state_dict",
    ]


def test_listed_by_describe_plugins():
    enabled = describe_plugins(["gradnoise"])
    row = next(line for line in enabled.splitlines() if line.startswith("gradnoise "))
    assert row.split()[:4] == ["gradnoise", "yes", "expertrain-gradnoise", "0.1.0"]
    assert "after_backward" in row and "gradnoise" in row.split()[4]
    disabled = describe_plugins([])
    assert next(line for line in disabled.splitlines() if line.startswith("gradnoise ")).split()[1] == "no"


def test_section_validates(pm):
    config = job(pm, gradnoise={"eta": 0.3, "gamma": 0.55, "seed": 7})
    assert (config.gradnoise.eta, config.gradnoise.gamma, config.gradnoise.seed) == (0.3, 0.55, 7)
    with pytest.raises(ConfigError, match=r"config key 'gradnoise.eta': got -1.0; expected a number >= 0.0"):
        job(pm, gradnoise={"eta": -1.0})
    with pytest.raises(ConfigError, match="'gradnoise.etta'.*unknown key"):
        job(pm, gradnoise={"etta": 0.1})


def test_sigma_follows_the_annealing_schedule(pm):
    from expertrain_gradnoise import sigma

    eta, gamma = 0.3, 0.55
    assert sigma(1, eta, gamma) == pytest.approx(math.sqrt(0.3))  # t = 0 at the first step
    assert sigma(11, eta, gamma) == pytest.approx(math.sqrt(0.3 / 11**0.55))
    config = job(pm, gradnoise={"eta": eta, "gamma": gamma})
    metrics = pm.merge_metrics(step=101, model=None, config=config)
    assert metrics == {"gradnoise/sigma": pytest.approx(math.sqrt(0.3 / 101**0.55))}


def _grads_after_noise(pm, config, step: int, global_seed: int) -> dict[str, torch.Tensor]:
    """One simulated rank: same model and gradients, but its own global RNG state (as after different data)."""
    model = TinyModel()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.manual_seed(global_seed)
    torch.rand(global_seed + 1)  # advance the global generator differently on each "rank"
    pm.hook.expertrain_after_backward(step=step, model=model, config=config)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_noise_on_every_data_parallel_rank(pm):
    config = job(pm, gradnoise={"eta": 1.0, "gamma": 0.55, "seed": 3})
    rank0 = _grads_after_noise(pm, config, step=5, global_seed=0)
    rank1 = _grads_after_noise(pm, config, step=5, global_seed=1)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert rank0[name].abs().sum() > 0
    next_step = _grads_after_noise(pm, config, step=6, global_seed=0)
    assert not torch.equal(next_step["a.weight"], rank0["a.weight"])  # fresh noise each step
    other_seed = _grads_after_noise(pm, job(pm, gradnoise={"eta": 1.0, "seed": 4}), step=5, global_seed=0)
    assert not torch.equal(other_seed["a.weight"], rank0["a.weight"])


def test_noise_has_the_scheduled_standard_deviation(pm):
    from expertrain_gradnoise import add_gradient_noise, sigma

    model = torch.nn.Linear(400, 500, bias=False)
    model.weight.grad = torch.zeros_like(model.weight)
    std = sigma(50, 0.3, 0.55)
    assert add_gradient_noise(model, std, seed=0, step=50) == 1
    assert model.weight.grad.std().item() == pytest.approx(std, rel=0.02)
    assert model.weight.grad.mean().item() == pytest.approx(0.0, abs=0.01 * std)


def test_state_round_trip(pm, caplog):
    config = job(pm, gradnoise={"seed": 5})
    states = pm.plugin_state_dicts(model=None, config=config)
    assert states == {"gradnoise": {"eta": 0.01, "gamma": 0.55, "seed": 5}}
    pm.load_plugin_state_dicts(states, model=None, config=config)
    assert "differ from the checkpoint" not in caplog.text
    pm.load_plugin_state_dicts(states, model=None, config=job(pm, gradnoise={"seed": 6}))
    assert "seed: 5 -> 6" in caplog.text


def test_sharded_gradients_get_their_shard_of_the_unsharded_noise():
    """FSDP-style DTensor gradients: each rank's shard equals the matching slice of the unsharded noise.

    Runs both ranks of a 2-rank mesh in this process on torch's fake process group (no collective is needed).
    """
    import torch.distributed as dist
    from expertrain_gradnoise import add_gradient_noise
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")

    plain = torch.nn.Module()
    plain.register_parameter("weight", torch.nn.Parameter(torch.zeros(6, 3)))
    plain.weight.grad = torch.zeros(6, 3)
    add_gradient_noise(plain, std=1.0, seed=9, step=2)
    for rank in range(2):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=2)
        try:
            mesh = init_device_mesh("cpu", (2,))
            weight = torch.nn.Parameter(
                distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)], src_data_rank=None)
            )
            weight.grad = distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)], src_data_rank=None)
            sharded = torch.nn.Module()
            sharded.register_parameter("weight", weight)
            add_gradient_noise(sharded, std=1.0, seed=9, step=2)
            local = weight.grad.to_local()
            assert local.shape == (3, 3)
            assert torch.equal(local, plain.weight.grad.chunk(2)[rank])
        finally:
            dist.destroy_process_group()
