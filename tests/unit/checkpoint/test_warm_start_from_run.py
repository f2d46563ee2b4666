"""``model.init_from: <run>``: the job takes the base run's model shape from its saved job, and its weights are
loaded into the base tensors only (the adapters a plugin adds stay as initialised).

The base is a real 1-step training run in this process (the ``TINY`` model with the ``deepseek_moe`` block: a
plugin the model needs, whose section must come along); the fine-tuning jobs are small job files that name nothing
of the model's shape. Weights are compared with ``torch.equal`` (a copy, no round-off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from framework.checkpoint.export import load_model
from framework.checkpoint.warm_start import load_model_weights
from framework.config import ConfigError
from framework.train.launch import load_job, read_job
from tests.integration.launch import QUICKSTART, TINY

BASE = (
    *TINY,
    "train.steps=1",
    "train.sample_tokens=0",
    "data.val_fraction=0",
    "logging.plots=false",
    "logging.progress=false",
    "plugins=[deepseek_moe]",
    "moe.block=deepseek_moe",
    "moe.shared_experts=1",
    "moe.shared_expert_hidden=48",
    "model.n_layers=3",  # not the quickstart's, nor TINY's: must come from the base run
    "moe.first_k_dense=1",
)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from framework.parallel.setup import DistInfo
    from framework.train.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("init-from") / "base"
    config, pm = load_job(str(QUICKSTART), [*BASE, f"run.dir={run_dir}"])
    trainer = Trainer(config, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    trainer.run()
    return run_dir


def job_file(tmp_path: Path, init_from: Path | str, **sections: Any) -> Path:
    """A job file naming only ``model.init_from``, a short sequence and ``sections``."""
    job = {"model": {"init_from": str(init_from)}, "data": {"seq_len": 16}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def _saved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("source", ["run", "checkpoints", "step"])
def test_model_moe_and_needed_plugin_sections_come_from_the_base_run(
    source: str, base_run: Path, tmp_path: Path
) -> None:
    init_from = {
        "run": base_run,
        "checkpoints": base_run / "checkpoints",
        "step": base_run / "checkpoints" / "step_00000001",
    }[source]
    job = job_file(tmp_path, init_from, train={"steps": 2})
    raw = read_job(str(job), [])
    saved = _saved(base_run)
    assert raw["plugins"] == ["deepseek_moe"]
    config, _ = load_job(str(job), [], raw)
    assert config.model.init_from == str(init_from)
    got, want = config.to_dict(), saved
    assert {k: v for k, v in got["model"].items() if k != "init_from"} == {
        k: v for k, v in want["model"].items() if k != "init_from"
    }
    assert got["moe"] == want["moe"]
    assert got["deepseek_moe"] == want["deepseek_moe"]
    assert config.model.n_layers == 3 and config.train.steps == 2


def test_a_shape_the_job_contradicts_is_one_error_and_training_choices_may_differ(
    base_run: Path, tmp_path: Path
) -> None:
    job = job_file(tmp_path, base_run)
    with pytest.raises(ConfigError, match=r"model\.n_layers.*the run .* has 3; remove model\.n_layers"):
        read_job(str(job), ["model.n_layers=2"])
    raw = read_job(str(job), ["moe.aux_loss_coef=0.5", "model.max_seq_len=16"])
    assert raw["moe"]["aux_loss_coef"] == 0.5 and raw["model"]["max_seq_len"] == 16


def lora_model(job: Path) -> tuple[Any, set[str], dict[str, torch.Tensor]]:
    """The job's model (LoRA on every linear layer) as the trainer builds it: initialised, then transformed.
    Returns it, the base model's state-dict names and a copy of the adapters' initial values."""
    from framework.models import Transformer

    config, pm = load_job(str(job), [])
    model = Transformer(config.model, config.moe, pm.registry)
    base_keys = set(model.state_dict())
    model.init_weights(7)
    pm.hook.expertrain_transform_model(model=model, config=config)
    adapters = {k: v.clone() for k, v in model.state_dict().items() if k not in base_keys}
    assert adapters, "lora added no tensors"
    return model, base_keys, adapters


def assert_base_loaded(model: Any, base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items()), "a base tensor differs from the source's"
    assert all(torch.equal(state[k], v) for k, v in adapters.items()), "an adapter was overwritten"


def test_base_weights_load_into_a_lora_model_and_the_adapters_are_left_alone(
    base_run: Path, tmp_path: Path
) -> None:
    job = job_file(tmp_path, base_run, plugins=["lora"], lora={"targets": "all-linear", "r": 4})
    assert read_job(str(job), [])["plugins"] == [
        "lora",
        "deepseek_moe",
    ]  # the job's own first, then the base's
    model, base_keys, adapters = lora_model(job)
    with pytest.raises(ConfigError, match=r"the checkpoint has no tensor '.*lora"):
        load_model_weights(base_run, model)
    load_model_weights(base_run, model, keys=base_keys)
    want = load_model(base_run)[0].state_dict()
    assert_base_loaded(model, {k: want[k] for k in base_keys}, adapters)
