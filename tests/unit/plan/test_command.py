"""``expertrain plan`` end to end: the JSON plan of a tiny job, LoRA's trainable set, Hugging Face configs that the
importer refuses for training, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from framework.cli import main
from framework.hooks import hookimpl
from framework.plan.build import PlanError, build_on_meta, plan_job_config

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = str(REPO / "examples" / "configs" / "quickstart.yaml")
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96"]
TINY += ["moe.num_experts=4", "moe.expert_hidden=48", "train.micro_batch_size=2", "train.global_batch_size=8"]


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_plan_json_on_two_fsdp_ranks_halves_the_one_rank_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    one = _plan_json(capsys, "--config", QUICKSTART, "--nproc", "1", *_sets(TINY))
    two = _plan_json(capsys, "--config", QUICKSTART, "--nproc", "2", *_sets([*TINY, "parallel.data=fsdp"]))
    params = {p["kind"]: p["bytes"] for p in one["lines"]}["parameters"]
    assert params == one["model"]["total_params"] * 4  # fp32, nothing sharded on one rank
    # Every dimension of this model is even: FSDP's dim-0 shards are exactly half.
    assert {p["kind"]: p["bytes"] for p in two["lines"]}["parameters"] == params // 2
    assert two["total_bytes"] == sum(line["bytes"] for line in two["lines"])
    assert not dist.is_initialized()


def test_plan_counts_gradients_and_adamw_state_of_the_lora_adapters_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from framework.models import Transformer

    lora = ["plugins=[lora]", "lora.targets=all-linear", "lora.r=4", "lora.target_experts=true"]
    plan = _plan_json(capsys, "--config", QUICKSTART, *_sets([*TINY, *lora]))
    config, pm, _, _, _ = plan_job_config(1, QUICKSTART, [*TINY, *lora])
    model = Transformer(config.model, config.moe, pm.registry)  # a real CPU model, transformed for real
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    adapter = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    kinds = {line["kind"]: line["bytes"] for line in plan["lines"]}
    assert 0 < adapter < plan["model"]["total_params"] / 10
    assert kinds["gradients"] == adapter * 4
    assert kinds["optimizer state"] == adapter * 8
    assert kinds["parameters"] == sum(p.numel() for p in model.parameters()) * 4


def test_plan_reads_deepseek_v3_config_dropping_its_fp8_and_yarn_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = _plan_json(
        capsys,
        "--hf-config",
        str(REPO / "examples" / "models" / "deepseek-v3"),
        "--nproc",
        "64",
        "--gpu-memory",
        "80GB",
        *_sets(["parallel.ep=64", "data.seq_len=4096", "train.micro_batch_size=1"]),
        *_sets(["train.global_batch_size=64", "train.activation_checkpointing=true"]),
    )
    assert any("quantization_config ignored" in n for n in plan["notes"])
    assert any("rope_scaling ignored" in n for n in plan["notes"])
    # 61 layers of MLA, 3 dense, 58 with 256 routed + 1 shared expert: 671B without the MTP layer.
    assert 670e9 < plan["model"]["total_params"] < 672e9
    assert plan["capacity_bytes"] == 80 * 2**30 and plan["device"] == "cuda"


def test_a_layout_that_does_not_divide_the_ranks_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "plan",
        "--config",
        QUICKSTART,
        "--nproc",
        "3",
        "--set",
        "parallel.data=fsdp",
        "--set",
        "parallel.tp=2",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.tp" in err[0] and "divisor of the world size 3" in err[0]


def test_plan_leaves_no_process_group_and_no_default_device_behind() -> None:
    assert (
        main(
            [
                "plan",
                "--config",
                QUICKSTART,
                "--nproc",
                "4",
                *_sets([*TINY, "parallel.data=fsdp", "parallel.ep=2"]),
            ]
        )
        == 0
    )
    assert not dist.is_initialized()
    assert torch.empty(1).device.type == "cpu"


class _ReadsWeights:
    """A plugin whose transform reads weight values (as an SVD- or data-initialised adapter would)."""

    @hookimpl
    def expertrain_transform_model(self, model: torch.nn.Module) -> None:
        float(model.output.weight.abs().max())


def test_a_plugin_whose_transform_needs_real_weights_is_named_in_one_line() -> None:
    config, pm, layout, accumulation, notes = plan_job_config(1, QUICKSTART, TINY)
    pm.register_object("reads_weights", _ReadsWeights())
    with pytest.raises(PlanError) as info:
        build_on_meta(config, pm, layout, accumulation, notes)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("plugin 'reads_weights' is not plannable on meta")


def test_an_unreadable_gpu_memory_size_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", QUICKSTART, "--gpu-memory", "lots"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["expertrain: error: memory size 'lots': expected a number and a unit, e.g. 80GB or 512MiB"]
