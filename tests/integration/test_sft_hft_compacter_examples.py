"""examples/configs/sft_hft.yaml and sft_compacter.yaml at tiny shapes in one process, both fine-tuning a quickstart
base loaded through ``model.init_from``:

- HFT: the weights frozen in every stage (whole tensors and expert slices, from the stage selections) are
  bit-identical to the base, the others moved; a run resumed from its step-2 checkpoint across the stage boundary
  (``hft.stage_every=3``) gives the same losses and bit-identical weights as the uninterrupted run (the selection
  is restored from the checkpoint).
- Compacter: every base tensor except the norms is bit-identical to the base; ``expertrain export compacter`` writes
  the adapters; ``expertrain export peft`` refuses Compacter by name.

Four short jobs in this process (no torchrun): base 1 step, HFT 4 steps (+2 resumed), Compacter 3 steps. Resume
tolerance: bit-identical (same process, kernels and data order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import load_model
from framework.cli import main as cli_main
from framework.observe.metrics import read_metrics
from plugins.peft import compacter, hft
from tests.integration.launch import QUICKSTART, REPO, TINY

EXAMPLES = REPO / "examples" / "configs"
QUIET = ("data.val_fraction=0", "logging.plots=false", "logging.progress=false", "train.sample_tokens=0")


def _train(config: Path, run_dir: Path, overrides: tuple[str, ...]) -> None:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    job, pm = load_job(str(config), [*TINY, *QUIET, f"run.dir={run_dir}", *overrides])
    trainer = Trainer(job, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    trainer.run()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("base")
    _train(QUICKSTART, run, ("train.steps=1",))
    return run


def test_sft_hft_example_keeps_the_frozen_half_and_resumes(base: Path, tmp_path: Path) -> None:
    run, resumed = tmp_path / "hft", tmp_path / "resumed"
    job = (f"model.init_from={base}", "train.steps=4", "checkpoint.every=2", "hft.stage_every=3")
    _train(EXAMPLES / "sft_hft.yaml", run, job)
    base_weights = dict(load_model(base)[0].named_parameters())
    model, config, _, _ = load_model(run)
    weights = dict(model.named_parameters())
    stages = [hft.select(model, config.hft.seed, s) for s in (0, 1)]  # steps 1-3, step 4
    frozen = set(stages[0].frozen) & set(stages[1].frozen)
    trained = set(stages[0].trained) | set(stages[1].trained)
    assert frozen and trained
    for name in frozen:
        assert torch.equal(weights[name], base_weights[name]), name
    for name in trained:
        assert not torch.equal(weights[name], base_weights[name]), name
    for path in stages[0].experts:  # TINY: 2 MoE layers of 4 experts
        ids = sorted(set(range(4)) - set(stages[0].experts[path]) - set(stages[1].experts[path]))
        for w in ("gate_up_proj", "down_proj"):
            key = f"{path}.{w}"
            assert torch.equal(weights[key][ids], base_weights[key][ids]), key
            assert not torch.equal(weights[key], base_weights[key]), key

    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    _train(EXAMPLES / "sft_hft.yaml", resumed, job)
    assert _losses(resumed) == _losses(run) and len(_losses(run)) == 4
    again = dict(load_model(resumed)[0].named_parameters())
    for name, value in weights.items():
        assert torch.equal(again[name], value), name


def test_sft_compacter_example_trains_adapters_and_exports(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "compacter"
    # TINY has dim 32: bottleneck 32 / 8 = 4, divisible by n = 4 as in the example.
    _train(EXAMPLES / "sft_compacter.yaml", run, (f"model.init_from={base}", "train.steps=3"))
    assert "compacter: compacter, 4 adapters (n=4, bottleneck 4)" in capsys.readouterr().out
    base_weights = load_model(base)[0].state_dict()
    model, config, _, _ = load_model(run)
    weights = model.state_dict()
    norms = set(compacter.norm_parameter_names(model))
    adapters = set(compacter.adapter_parameter_names(model))
    assert set(weights) - adapters == set(base_weights)
    for name, value in base_weights.items():
        assert torch.equal(weights[name], value) == (name not in norms), name

    out = tmp_path / "export"
    assert cli_main(["export", "compacter", "--checkpoint", str(run), "--output", str(out)]) == 0
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == adapters | norms
    assert json.loads((out / "adapter_config.json").read_text())["base_model"]["init_from"] == str(base)
    capsys.readouterr()
    assert cli_main(["export", "peft", "--checkpoint", str(run), "--output", str(tmp_path / "peft")]) != 0
    assert "compacter adapters cannot be exported as peft" in capsys.readouterr().err
