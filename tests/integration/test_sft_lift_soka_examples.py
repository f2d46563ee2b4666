"""examples/configs/sft_lift.yaml and sft_soka.yaml at tiny shapes in one process: each fine-tunes a quickstart base
loaded through ``model.init_from``. LIFT (masks redrawn before step 3) changes only entries that were in a mask,
resumes from its step-2 checkpoint to the same result as the uninterrupted run (the mask is in the model state, the
sparse moments in the optimizer's), and ``expertrain export lift`` writes the final mask and values. SoKA keeps the
base output at step 0 by construction (unit tests), trains only its factors, and ``expertrain export soka`` writes
them.

The trainer runs in this process (one rank, no torchrun). Resume tolerance: bit-identical (same process, same
kernels, same data order).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import load_model
from framework.cli import main as cli_main
from framework.observe.metrics import read_metrics
from plugins.peft import lift, soka
from tests.integration.launch import QUICKSTART, REPO, TINY

EXAMPLES = REPO / "examples" / "configs"
SFT_LIFT = EXAMPLES / "sft_lift.yaml"
SFT_SOKA = EXAMPLES / "sft_soka.yaml"
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
    path = tmp_path_factory.mktemp("base") / "base"
    _train(QUICKSTART, path, ("train.steps=1",))
    return path


def test_sft_lift_example_trains_sparse_resumes_and_exports(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, resumed = tmp_path / "sft", tmp_path / "resumed"
    job = (
        f"model.init_from={base}",
        "train.steps=4",
        "checkpoint.every=2",
        "lift.r=2",
        "lift.filter_rank=4",
        "lift.update_interval=2",
        "optim.lr=1e-2",
    )
    _train(SFT_LIFT, run, job)
    out = capsys.readouterr().out
    assert re.search(
        r"^lift: adapted 8 linear modules \(q_proj x2, k_proj x2, v_proj x2, o_proj x2\)", out, re.M
    )
    assert "lift: new masks before step 3" in out

    base_model = load_model(base)[0].state_dict()
    model, _, _, _ = load_model(run)
    modules = dict(lift.lift_modules(model))
    assert len(modules) == 8
    for name, value in base_model.items():
        path = name.removesuffix(".weight")
        if path in modules:  # changed only where a mask was: at most 2K entries (two masks), and some did
            changed = (modules[path].effective_weight() != value).sum()
            assert 0 < changed <= 2 * modules[path].budget, name
        else:
            assert torch.equal(model.state_dict()[name], value), f"frozen weight {name} changed"

    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    _train(SFT_LIFT, resumed, job)
    assert _losses(resumed) == _losses(run) and len(_losses(run)) == 4
    again = load_model(resumed)[0].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(again[name], value), name

    export = tmp_path / "lift"
    assert cli_main(["export", "lift", "--checkpoint", str(run), "--output", str(export)]) == 0
    tensors = load_file(str(export / "lift_model.safetensors"))
    assert len(tensors) == 2 * 8
    q = modules["layers.1.attention.q_proj"]
    rows, cols = tensors["model.layers.1.self_attn.q_proj.lift_indices"]
    assert torch.equal(
        tensors["model.layers.1.self_attn.q_proj.lift_values"], q.effective_weight()[rows, cols]
    )
    assert json.loads((export / "lift_config.json").read_text())["base_model_name_or_path"] == str(base)


def test_sft_soka_example_trains_factors_and_exports(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "sft"
    _train(SFT_SOKA, run, (f"model.init_from={base}", "train.steps=2"))
    assert re.search(r"^soka: adapted 8 linear modules .*Kronecker ranks", capsys.readouterr().out, re.M)
    base_model = load_model(base)[0].state_dict()
    model, _, _, _ = load_model(run)
    modules = dict(soka.soka_modules(model))
    for name, value in base_model.items():
        path = name.removesuffix(".weight")
        if (
            path in modules
        ):  # residual + initial principal terms = the base (fp32 round-off of the fp64 split)
            m = modules[path]
            torch.testing.assert_close(
                m.weight + soka.kron_sum(m.soka_A0, m.soka_B0), value, rtol=0, atol=1e-6
            )
            assert not torch.equal(m.soka_A, m.soka_A0)
        else:
            assert torch.equal(model.state_dict()[name], value), f"frozen weight {name} changed"
    export = tmp_path / "soka"
    assert cli_main(["export", "soka", "--checkpoint", str(run), "--output", str(export)]) == 0
    tensors = load_file(str(export / "soka_model.safetensors"))
    assert len(tensors) == 4 * 8
    meta = json.loads((export / "soka_config.json").read_text())
    assert meta["method"] == "SOKA" and len(meta["modules"]) == 8
