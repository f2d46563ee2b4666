"""examples/configs/sft_corda.yaml at tiny shapes in one process: it calibrates and fine-tunes a quickstart base
loaded through ``model.init_from`` (only the adapters change), resumes from a checkpoint to the same result as an
uninterrupted run, and ``expertrain export peft`` writes a rank-2r LoRA that peft loads onto the ORIGINAL base (an
HF folder written from the init_from checkpoint) with our model's logits.

Three jobs in all: the base (1 step), the fine-tune (4 steps, checkpoints at 2 and 4) and a copy resumed from its
step-2 checkpoint. Resume tolerance: bit-identical (same process and kernels; the checkpoint restores the residual
bases, adapters, B₀/A₀ and Adam moments, and calibration is skipped). peft logits: 1e-5 absolute (fp32, logits of
order 1; the residual base plus the delta rounds each weight once more, ~1e-6).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from framework.checkpoint.export import load_model
from framework.cli import main as cli_main
from framework.observe.metrics import read_metrics
from plugins.peft.corda import adapter_parameter_names, corda_modules
from tests.integration.launch import QUICKSTART, REPO, TINY

SFT_CORDA = REPO / "examples" / "configs" / "sft_corda.yaml"
QUIET = ("data.val_fraction=0", "logging.plots=false", "logging.progress=false", "train.sample_tokens=0")
HF_SHAPE = ("model.ffn_hidden=32",)  # transformers' Mixtral has one FFN width: dense = expert hidden


def _train(config: Path, run_dir: Path, overrides: tuple[str, ...]) -> None:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    job, pm = load_job(str(config), [*TINY, *HF_SHAPE, *QUIET, f"run.dir={run_dir}", *overrides])
    trainer = Trainer(job, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    trainer.run()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_sft_corda_example_calibrates_resumes_and_exports_to_peft(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from framework.interop.hf import save_pretrained

    base, run, resumed = tmp_path / "base", tmp_path / "sft", tmp_path / "resumed"
    _train(QUICKSTART, base, ("train.steps=1",))
    job = (f"model.init_from={base}", "train.steps=4", "checkpoint.every=2", "corda.calibration_samples=8")
    _train(SFT_CORDA, run, job)
    out = capsys.readouterr().out
    assert re.search(
        r"^corda: adapted 8 linear modules \(q_proj x2, k_proj x2, v_proj x2, o_proj x2\)", out, re.M
    )
    assert "corda: decomposed 8 modules" in out

    # Frozen: the residual bases and every other base tensor are those of step 0; the adapters trained.
    base_model = load_model(base)[0]
    model, config, _, _ = load_model(run)
    trained = model.state_dict()
    adapters = set(adapter_parameter_names(model))
    assert set(trained) - adapters == set(base_model.state_dict())
    originals = dict(base_model.named_modules())
    for path, m in corda_modules(model):
        assert not torch.equal(m.lora.lora_B, m.lora_B0.to(m.lora.lora_B.dtype)), f"{path} did not train"
        # The base is the residual of the initial factors: W_res + s·B₀A₀ = the init_from weight.
        w = m.weight + m.lora.scaling * m.lora_B0 @ m.lora_A0
        torch.testing.assert_close(w, originals[path].weight, atol=1e-6, rtol=0)
    for name, value in base_model.state_dict().items():
        if not any(name.startswith(p + ".") for p, _ in corda_modules(model)):
            assert torch.equal(trained[name], value), f"base weight {name} changed"

    # Resume from the step-2 checkpoint of a copy: steps 3-4 and the final adapters equal the uninterrupted run.
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    _train(SFT_CORDA, resumed, job)
    assert "corda: decomposed" not in capsys.readouterr().out  # a resume does not calibrate again
    assert _losses(resumed) == _losses(run) and len(_losses(run)) == 4
    again = load_model(resumed)[0].state_dict()
    for name in adapters:
        assert torch.equal(again[name], trained[name]), name

    # The peft export applies to the ORIGINAL base (written as an HF folder) and gives our logits.
    export, hf_base = tmp_path / "adapter", tmp_path / "hf_base"
    assert cli_main(["export", "peft", "--checkpoint", str(run), "--output", str(export)]) == 0
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * config.corda.r and cfg["lora_alpha"] == 2 * config.corda.alpha
    save_pretrained(base_model, hf_base)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        hf = AutoModelForCausalLM.from_pretrained(hf_base).eval()
        got = peft.PeftModel.from_pretrained(hf, str(export)).eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
