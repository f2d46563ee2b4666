"""A MoLA export reloaded from its files alone and applied: the settings from ``adapter_config.json``, the tensors
from ``adapter_model.safetensors`` in the documented layout (docs/plugins/mola.md), onto the same base weights.

Reference: the adapted model that was exported. The reloaded model runs the same modules on the same values, so its
logits must equal the exported model's bit for bit (``torch.equal``); before the tensors are loaded they differ by
more than 1e-3 (the check sees the adapters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from framework.config import resolve
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from plugins.moe import mola
from plugins.moe.mola import mola_modules
from plugins.peft.low_rank import experts_from_peft
from tests.unit.plugins.tiny_jobs import MOE_JOB_4_LAYERS

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
SMALL = MOE_JOB_4_LAYERS


def _build(raw: dict[str, Any]) -> tuple[Transformer, Any, PluginManager]:
    """A base model (init seed 0, as the exported one's base) with MoLA applied as the job ``raw`` says."""
    pm = PluginManager(default_registry())
    pm.register_object("mola", mola)
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)
    return model.eval(), config, pm


def _job_from_adapter_config(adapter: dict[str, Any]) -> dict[str, Any]:
    base = adapter["base_model"]
    return {
        "plugins": ["mola"],
        "model": base["model"],
        "moe": base["moe"],
        "data": {"seq_len": base["model"]["max_seq_len"]},
        "train": {"seed": base["seed"]},
        "mola": {
            "targets": adapter["target_modules"],
            "experts": adapter["experts_per_layer"],
            "top_k": adapter["top_k"],
            "r": adapter["r"],
            "alpha": adapter["lora_alpha"],
            "rslora": adapter["use_rslora"],
            "dropout": adapter["lora_dropout"],
            "modules_to_save": adapter["modules_to_save"] or [],
        },
    }


def test_export_reloaded_from_its_files_reproduces_the_model_bit_for_bit(tmp_path: Path) -> None:
    """Routers, LoRA experts and the head trained in full (mola.modules_to_save) reloaded from the files alone."""
    section = {"targets": ["q_proj", "v_proj", "down_proj"], "top_k": 2, "r": 4, "alpha": 8.0}
    section["modules_to_save"] = ["lm_head"]
    model, config, pm = _build({"plugins": ["mola"], **SMALL, "mola": section})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters, routers and the head as if trained
        for _, m in mola_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
        model.output.weight.add_(torch.randn(model.output.weight.shape, generator=g))
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="mola")
    assert files == [["adapter_model.safetensors", "adapter_config.json"]]

    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    reloaded, _, _ = _build(_job_from_adapter_config(adapter))
    modules = dict(mola_modules(reloaded))
    assert sorted(modules) == sorted(adapter["modules"]) == sorted(p for p, _ in mola_modules(model))
    with torch.no_grad():
        expected = model(IDS)
        assert (reloaded(IDS) - expected).abs().max() > 1e-3  # the adapters matter to the logits
        for path, m in modules.items():
            key = f"base_model.model.{path}"
            A, B = experts_from_peft(
                tensors[f"{key}.lora_A.weight"],
                tensors[f"{key}.lora_B.weight"],
                adapter["modules"][path]["num_experts"],
            )
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
            m.router.weight.copy_(tensors[f"{key}.router.weight"])
        assert adapter["modules_to_save"] == ["output"]
        reloaded.output.weight.copy_(tensors["base_model.model.output.weight"])
        assert len(tensors) == 3 * len(modules) + 1  # nothing in the file was left unused
        assert torch.equal(reloaded(IDS), expected)
