"""Exports of jobs whose plugins change the model, streamed past a model that holds only the plugins' tensors
(:class:`~framework.checkpoint.partial.PartialModel`), write the bytes of the whole-model path they replace
(``whole_model=True``: the model rebuilt by ``load_model``, as before streaming): every file of ``export <plugin
format>``, ``export native`` and ``export hf --merge`` compared byte for byte.

Checkpoints are written as the trainer's store writes them (model state dict, plugin state, job config) from a tiny
MoE job assembled in one process whose every tensor was then moved off its init (trained adapters: LoRA's ``B`` is
no longer 0), so an export that read a fresh init instead of the checkpoint would differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from framework.checkpoint import export
from framework.checkpoint.export import (
    checkpoint_job,
    export_hf,
    export_native,
    export_plugin_format,
    merges_per_tensor,
)
from framework.checkpoint.partial import ExportReadsBaseWeight, PartialModel
from framework.checkpoint.store import CheckpointStore
from framework.checkpoint.stream import CheckpointTensors
from framework.config import resolve
from framework.hooks import PluginManager, hookimpl
from framework.models import default_registry
from framework.train.assembly import assemble_single_process
from tests.unit.plugins.tiny_jobs import MOE_JOB

SMALL = MOE_JOB
ALL_MOE = {"num_experts": 4, "expert_hidden": 24, "every": 1}
"""Every layer MoE: a model a Hugging Face family (mixtral) holds, for the hf exports."""
LORA = {"targets": "all-linear", "target_experts": True, "r": 4, "alpha": 8}


def job_checkpoint(root: Path, plugins: list[str], **sections: Any) -> Path:
    """A checkpoint of a tiny job with ``plugins``, every tensor moved off its init, as the trainer saves one."""
    raw: dict[str, Any] = {"plugins": plugins, **{k: dict(v) for k, v in SMALL.items()}, **sections}
    pm = PluginManager(default_registry())
    pm.load(plugins)
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = assemble_single_process(config, pm).raw
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))
    state = {"model": model.state_dict(), "plugins": pm.plugin_state_dicts(model, config)}
    meta = {"config": config.to_dict(), "world_size": 1}
    return CheckpointStore(root / "run" / "checkpoints").save(3, state, meta, {})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "export.json"}


def _assert_same(streamed: Path, whole: Path) -> None:
    ours, theirs = _files(streamed), _files(whole)
    assert sorted(ours) == sorted(theirs)
    different = [name for name in theirs if ours[name] != theirs[name]]
    assert not different, f"files differ from the whole-model export: {different}"


PLUGIN_FORMATS = [
    (["lora"], "peft", {"lora": LORA}),
    (["lora"], "peft", {"lora": {**LORA, "modules_to_save": ["norm", "output"]}}),
    (["compacter"], "compacter", {"compacter": {"reduction_factor": 8}}),
    (["corda"], "corda", {}),
    (["lift"], "lift", {"lift": {"target_experts": True}}),
    (["soka"], "soka", {}),
    (["mola"], "mola", {}),
]


@pytest.mark.parametrize(
    ("plugins", "fmt", "sections"),
    PLUGIN_FORMATS,
    ids=["peft", "peft-modules_to_save", *(f for _, f, _ in PLUGIN_FORMATS[2:])],
)
def test_plugin_format_and_native_exports_from_the_partial_model_are_byte_identical_to_the_whole_model_ones(
    tmp_path: Path, plugins: list[str], fmt: str, sections: dict[str, Any]
) -> None:
    checkpoint = job_checkpoint(tmp_path, plugins, **sections)
    config, pm, _ = checkpoint_job(checkpoint)
    assert not pm.transforms_needing_weights(), f"{plugins} would take the whole-model path"
    written = export_plugin_format(checkpoint, tmp_path / "streamed", fmt)
    assert written == export_plugin_format(checkpoint, tmp_path / "whole", fmt, whole_model=True)
    _assert_same(tmp_path / "streamed", tmp_path / "whole")
    native = export_native(checkpoint, tmp_path / "native")  # every tensor, plus what plugins add to native
    assert native == export_native(checkpoint, tmp_path / "native_whole", whole_model=True)
    _assert_same(tmp_path / "native", tmp_path / "native_whole")


@pytest.mark.parametrize("saved", [[], ["norm", "output"]], ids=["adapters", "modules_to_save"])
def test_lora_exports_load_only_the_adapters_and_merge_per_tensor_to_the_same_bytes(
    tmp_path: Path, saved: list[str]
) -> None:
    checkpoint = job_checkpoint(tmp_path, ["lora"], lora={**LORA, "modules_to_save": saved}, moe=ALL_MOE)
    config, pm, path = checkpoint_job(checkpoint)
    partial = PartialModel(path, config, pm, "peft")
    base = set(partial.base.state_dict())
    trained_base = {f"{m}.weight" for m in saved}  # modules_to_save: base modules trained in full, so loaded
    assert partial.loaded and base & set(partial.loaded) == trained_base, "a frozen base weight was loaded"
    assert all(".lora" in name or name in trained_base for name in partial.loaded)
    assert all(t.is_meta for name, t in partial.model.state_dict().items() if name in base - trained_base)

    assert merges_per_tensor(pm)
    for shard in (None, 20_000):
        streamed, whole = tmp_path / f"merged_{shard}", tmp_path / f"merged_whole_{shard}"
        written = export_hf(checkpoint, streamed, merge=True, max_shard_bytes=shard)
        assert written == export_hf(checkpoint, whole, merge=True, max_shard_bytes=shard, whole_model=True)
        _assert_same(streamed, whole)
    export_native(checkpoint, tmp_path / "native")
    export_native(checkpoint, tmp_path / "native_whole", whole_model=True)
    _assert_same(tmp_path / "native", tmp_path / "native_whole")


class _ReadsBase:
    """An export that reads a frozen base weight: ``declare`` says whether it names it first."""

    def __init__(self, declare: bool) -> None:
        self.declare = declare
        self.seen: torch.Tensor | None = None

    @hookimpl
    def expertrain_export_tensors(self, model: nn.Module, export_format: str) -> list[str] | None:
        return ["norm.weight"] if self.declare else None

    @hookimpl
    def expertrain_export(self, model: nn.Module, output_dir: Path, export_format: str) -> list[str] | None:
        self.seen = model.norm.weight.detach().cpu().clone()
        return []


@pytest.mark.parametrize("declare", [False, True], ids=["undeclared", "declared"])
def test_an_export_reading_a_base_weight_must_declare_it_or_ask_for_the_whole_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, declare: bool
) -> None:
    """A plugin (registered in-process beside the job's lora) whose export reads ``norm.weight``: undeclared, the
    streamed export stops with one error naming the plugin, the hook and --whole-model, and leaves nothing; the
    whole-model export works. Declared, the streamed export gives it the checkpoint's values."""
    checkpoint = job_checkpoint(tmp_path, ["lora"], lora=LORA)
    plugin = _ReadsBase(declare)

    def job_with_plugin(path: Path) -> tuple[Any, PluginManager, Path]:
        config, pm, resolved = checkpoint_job(path)
        pm.register_object("reads_base", plugin)
        return config, pm, resolved

    monkeypatch.setattr(export, "checkpoint_job", job_with_plugin)
    stored = CheckpointTensors(checkpoint).load(["norm.weight"])["norm.weight"]
    if not declare:
        match = "plugin 'reads_base' read a frozen base weight in expertrain_export.*--whole-model"
        with pytest.raises(ExportReadsBaseWeight, match=match):
            export.export_plugin_format(checkpoint, tmp_path / "out", "x")
        assert not (tmp_path / "out").exists()
        export.export_plugin_format(checkpoint, tmp_path / "out", "x", whole_model=True)
    else:
        export.export_plugin_format(checkpoint, tmp_path / "out", "x")
    assert plugin.seen is not None and torch.equal(plugin.seen, stored)


MERGING = [
    (["corda"], {}),
    (["lift"], {"lift": {"target_experts": True}}),
    (["soka"], {"soka": {"target_experts": True}}),
]


@pytest.mark.parametrize(("plugins", "sections"), MERGING, ids=[p[0] for p, _ in MERGING])
def test_merged_hf_export_per_tensor_is_byte_identical_to_the_whole_model_merge(
    tmp_path: Path, plugins: list[str], sections: dict[str, Any]
) -> None:
    checkpoint = job_checkpoint(tmp_path, plugins, moe=ALL_MOE, **sections)
    _, pm, _ = checkpoint_job(checkpoint)
    assert merges_per_tensor(pm), f"{plugins} would merge on the whole model"
    written = export_hf(checkpoint, tmp_path / "streamed", merge=True)
    assert written == export_hf(checkpoint, tmp_path / "whole", merge=True, whole_model=True)
    _assert_same(tmp_path / "streamed", tmp_path / "whole")
