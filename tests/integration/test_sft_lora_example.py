"""examples/configs/sft_lora.yaml at tiny shapes in one process: it fine-tunes a quickstart base loaded through
``model.init_from`` with only the adapters and the final norm (``lora.modules_to_save``) changing, resumes from a checkpoint to the same result as an uninterrupted
run, and ``expertrain export peft`` writes the adapters of the final checkpoint.

The trainer runs in this process (one rank, no torchrun), three jobs in all: the base (1 step), the fine-tune (4
steps, checkpoints at 2 and 4) and a copy of it resumed from its step-2 checkpoint. The schedule is still in warm-up
at step 4, so it does not depend on where a run stops. Resume tolerance: bit-identical (same process, same
kernels, same data order; a resume restores adapters, Adam moments and the data position exactly).
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
from plugins.peft.lora import adapter_parameter_names
from tests.integration.launch import QUICKSTART, REPO, TINY

SFT_LORA = REPO / "examples" / "configs" / "sft_lora.yaml"
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


def test_sft_lora_example_fine_tunes_resumes_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base, run, resumed = tmp_path / "base", tmp_path / "sft", tmp_path / "resumed"
    _train(QUICKSTART, base, ("train.steps=1",))
    lora_job = (
        f"model.init_from={base}",
        "train.steps=4",
        "checkpoint.every=2",
        "lora.modules_to_save=[norm]",
    )
    _train(SFT_LORA, run, lora_job)
    out = capsys.readouterr().out
    # TINY: 2 MoE layers of 4 experts; all-linear = attention q/k/v/o of both layers.
    assert re.search(
        r"^lora: adapted 8 linear modules .* and the routed experts of 2 MoE layers \(8 experts\)", out, re.M
    )

    # Frozen base: every base tensor but the saved final norm is bit-identical to the init_from checkpoint; the norm
    # and every B trained away from their start.
    base_model = load_model(base)[0].state_dict()
    model, config, _, _ = load_model(run)
    trained = model.state_dict()
    adapters = set(adapter_parameter_names(model))
    assert set(trained) - adapters == set(base_model)
    for name, value in base_model.items():
        assert torch.equal(trained[name], value) == (name != "norm.weight"), (
            f"{name}: only norm.weight trains"
        )
    assert all(torch.count_nonzero(trained[n]) > 0 for n in adapters if n.endswith("lora_B"))

    # Resume from the step-2 checkpoint of a copy: steps 3-4 and the final adapters equal the uninterrupted run.
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    _train(SFT_LORA, resumed, lora_job)
    assert _losses(resumed) == _losses(run) and len(_losses(run)) == 4
    again = load_model(resumed)[0].state_dict()
    for name in [*adapters, "norm.weight"]:
        assert torch.equal(again[name], trained[name]), name

    export = tmp_path / "adapter"
    assert cli_main(["export", "peft", "--checkpoint", str(run), "--output", str(export)]) == 0
    tensors = load_file(str(export / "adapter_model.safetensors"))
    assert (
        len(tensors) == len(adapters) + 1
    )  # A and B of 8 linears, gate_up and down of 2 expert layers; the norm
    assert torch.equal(tensors["base_model.model.model.norm.weight"], trained["norm.weight"])
    q = "base_model.model.model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(
        tensors[f"{q}.lora_B.weight"], trained["layers.1.attention.q_proj.lora.lora_B"]
    )
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (
        4 * 8,
        32,
    )
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == str(base)
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert adapter_config["modules_to_save"] == ["model.norm"]
    assert config.lora.r == adapter_config["r"] == 8
