"""``expertrain export hf|native`` streamed from a checkpoint (never building the model) write the same bytes as the
in-memory path they replace: the model rebuilt by ``load_model``, its whole state dict converted and written with
``safetensors.torch.save_file`` (kept here as the reference). Every file is compared byte for byte.

Checkpoints are written the way the trainer's store writes them (``CheckpointStore.save`` of the model's state dict
and the job config) from a tiny random model of each Hugging Face family (tests/unit/interop/test_hf_families.py),
so the export sees each family's layout: fused experts, Mixtral's prefix, shared experts (gated or not), MLA with
interleaved RoPE rows, DeepSeek's expert biases, tied embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from framework.checkpoint.export import export_hf, export_native, load_job, load_model, streams_tensors  # noqa: E402
from framework.checkpoint.store import CheckpointStore  # noqa: E402
from framework.config import JobConfig, resolve  # noqa: E402
from framework.hooks import PluginManager  # noqa: E402
from framework.interop.hf import HFCheckpointError, load_pretrained, spec_from_model  # noqa: E402
from framework.interop.hf.config_map import hf_config_from_spec  # noqa: E402
from framework.interop.hf.folders import _layout, spec_from_job  # noqa: E402
from framework.interop.hf.state_map import native_to_hf, rules_for  # noqa: E402
from framework.models import Transformer, default_registry  # noqa: E402
from tests.unit.interop.test_hf_families import FAMILIES, _saved  # noqa: E402

SMALL_SHARDS = 20_000
"""Bytes per shard that split every tiny family into several files (tensors of 1-12 KB)."""


def _checkpoint(tmp_path: Path, family: str, **extra: object) -> Path:
    """A checkpoint of the family's tiny model, as the store writes it (model tensors + job config in meta.json)."""
    _, folder = _saved(tmp_path, family, **extra)
    loaded = load_pretrained(folder)
    return _save(tmp_path, loaded.model.state_dict(), loaded.config)


def _save(tmp_path: Path, state: dict[str, torch.Tensor], config: JobConfig) -> Path:
    job = config.to_dict()
    job["data"]["seq_len"] = config.model.max_seq_len  # the job's other sections at their defaults otherwise
    meta = {"config": job, "world_size": 1}
    return CheckpointStore(tmp_path / "run" / "checkpoints").save(3, {"model": state}, meta, {})


def _reference_hf(model: Transformer, out: Path, max_shard_bytes: int) -> None:
    """The writer before streaming: the whole state dict converted at once, shards written with save_file."""
    spec = spec_from_model(model)
    config = hf_config_from_spec(spec, dtype="float32")
    rules = rules_for(model.state_dict(), _layout(model, spec), model.model_cfg.tie_embeddings)
    tensors = native_to_hf(model.state_dict(), rules)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    out.mkdir(parents=True)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(v.nbytes for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "export.json"}


def _assert_same_files(ours: Path, reference: Path) -> None:
    mine, theirs = _files(ours), _files(reference)
    assert sorted(mine) == sorted(theirs)
    different = [name for name in theirs if mine[name] != theirs[name]]
    assert not different, f"files differ from the in-memory export: {different}"


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_hf_export_is_byte_identical_to_the_in_memory_one(tmp_path: Path, family: str) -> None:
    extra = {"tie_word_embeddings": True} if family == "llama" else {}
    checkpoint = _checkpoint(tmp_path, family, **extra)
    assert streams_tensors(load_job(checkpoint)[1]), (
        "the core model (and deepseek_moe) export without a build"
    )
    model = load_model(checkpoint)[0]
    for max_shard_bytes in (None, SMALL_SHARDS):
        out = tmp_path / f"ours_{max_shard_bytes}"
        written = export_hf(checkpoint, out, max_shard_bytes=max_shard_bytes)
        reference = tmp_path / f"reference_{max_shard_bytes}"
        _reference_hf(model, reference, max_shard_bytes or 5 * 1024**3)
        _assert_same_files(out, reference)
        assert sorted(written) == sorted(_files(out))
        assert (len(written) > 3) == (max_shard_bytes is not None), written  # several shards + index + config
        assert json.loads((out / "export.json").read_text())["files"] == written


@pytest.mark.parametrize("family", ["deepseek_v3", "llama"])
def test_streamed_native_export_is_byte_identical_to_save_file_of_the_state_dict(
    tmp_path: Path, family: str
) -> None:
    extra = {"tie_word_embeddings": True} if family == "llama" else {}
    checkpoint = _checkpoint(tmp_path, family, **extra)
    written = export_native(checkpoint, tmp_path / "ours")
    model, config, _, _ = load_model(checkpoint)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "expertrain-native"})
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()
    assert yaml.safe_load((tmp_path / "ours" / "config.yaml").read_text()) == config.to_dict()
    assert written == ["model.safetensors", "config.yaml"]


def test_tied_head_stored_once_in_the_checkpoint_is_exported_under_both_names(tmp_path: Path) -> None:
    """A checkpoint writer may keep one copy of a tied head; the native export still lists ``output.weight``."""
    _, folder = _saved(tmp_path, "llama", tie_word_embeddings=True)
    loaded = load_pretrained(folder)
    state = {k: v for k, v in loaded.model.state_dict().items() if k != "output.weight"}
    checkpoint = _save(tmp_path, state, loaded.config)
    export_native(checkpoint, tmp_path / "ours")
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "ours" / "model.safetensors")
    assert torch.equal(exported["output.weight"], exported["tok_embeddings.weight"])
    assert set(exported) == set(loaded.model.state_dict())


@pytest.mark.parametrize(
    "options",
    [
        {"segments": 2, "n_shared_experts": 1, "isolate_shared": True},
        {"segments": 1, "n_shared_experts": 2, "isolate_shared": False, "shared_expert_gate": True},
        {"segments": 2, "n_shared_experts": 0},
    ],
)
def test_spec_from_job_equals_spec_from_the_built_model(options: dict[str, object]) -> None:
    """deepseek_moe's segmentation and isolation change the block's experts, top-k and shared hidden: the spec
    read from the job and the tensors' shapes is the one read from the built model's modules."""
    pm = PluginManager(default_registry())
    pm.load(["deepseek_moe"])
    raw = {
        "plugins": ["deepseek_moe"],
        "model": {
            "dim": 32,
            "n_layers": 3,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_hidden": 64,
            "vocab_size": 64,
        },
        "moe": {
            "block": "deepseek_moe",
            "num_experts": 4,
            "top_k": 2,
            "expert_hidden": 16,
            "first_k_dense": 1,
        },
        "deepseek_moe": options,
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    with torch.device("meta"):
        model = Transformer(config.model, config.moe, pm.registry)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert spec_from_job(config, shapes) == spec_from_model(model)


def test_streamed_export_of_a_tensor_without_hf_counterpart_leaves_nothing(tmp_path: Path) -> None:
    """An unknown model tensor in the checkpoint (a module HF lacks) is refused by name before any file is written,
    and the staging folder is removed."""
    _, folder = _saved(tmp_path, "qwen3_moe")
    loaded = load_pretrained(folder)
    state = {**loaded.model.state_dict(), "layers.0.extra.weight": torch.zeros(2)}
    checkpoint = _save(tmp_path, state, loaded.config)
    with pytest.raises(HFCheckpointError, match="model parameter 'layers.0.extra.weight' has no counterpart"):
        export_hf(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf_qwen3_moe", "run"])
