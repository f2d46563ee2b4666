"""``expertrain export hf|native`` streamed from a checkpoint (never building the model) write the same bytes as the
in-memory path they replace: the model rebuilt by ``load_model``, its whole state dict converted and written with
``safetensors.torch.save_file`` (kept here as the reference). Every file is compared byte for byte.

Checkpoints are written the way the trainer's store writes them (``CheckpointStore.save`` of the model's state dict
and the job config) from a tiny random model of each Hugging Face family (tests/unit/interop/test_hf_families.py),
so the export sees each family's layout: fused experts, Mixtral's prefix, shared experts (gated or not), MLA with
interleaved RoPE rows, DeepSeek's expert biases, tied embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")


from framework.checkpoint import export  # noqa: E402
from framework.checkpoint.export import checkpoint_job, export_hf, export_native, load_model, streams_tensors  # noqa: E402
from framework.checkpoint.safe_reader import CheckpointFormatError  # noqa: E402
from framework.checkpoint.store import CheckpointStore  # noqa: E402
from framework.config import JobConfig  # noqa: E402
from framework.interop.hf import HFConfigError, load_pretrained  # noqa: E402
from tests.unit.checkpoint.export_reference import reference_hf_folder, reference_native_file  # noqa: E402
from tests.unit.checkpoint.test_stream import count_reads  # noqa: E402
from tests.unit.interop.test_hf_families import FAMILIES, _saved  # noqa: E402

SMALL_SHARDS = 20_000
"""Bytes per shard that split every tiny family into several files (tensors of 1-12 KB)."""


def _checkpoint(tmp_path: Path, family: str, **extra: object) -> Path:
    """A checkpoint of the family's tiny model, as the store writes it (model tensors + job config in meta.json).

    The tensors are saved in reverse order: a checkpoint's order is not the model's (DCP puts a tensor-parallel
    run's sharded tensors before its replicated ones), and the export must follow the model's."""
    _, folder = _saved(tmp_path, family, **extra)
    loaded = load_pretrained(folder)
    return _save(tmp_path, dict(reversed(loaded.model.state_dict().items())), loaded.config)


def _save(tmp_path: Path, state: dict[str, torch.Tensor], config: JobConfig) -> Path:
    job = config.to_dict()
    job["data"]["seq_len"] = config.model.max_seq_len  # the job's other sections at their defaults otherwise
    meta = {"config": job, "world_size": 1}
    return CheckpointStore(tmp_path / "run" / "checkpoints").save(3, {"model": state}, meta, {})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "export.json"}


def _assert_same_files(ours: Path, reference: Path) -> None:
    """Every file of ``reference`` is in ``ours`` with the same bytes; ``ours`` adds only the run's tokenizer."""
    mine, theirs = _files(ours), _files(reference)
    different = [name for name in theirs if mine.get(name) != theirs[name]]
    assert not different, f"files differ from the in-memory export: {different}"
    extra = set(mine) - set(theirs)
    assert not any(name.startswith("model") or name == "config.json" for name in extra), extra


def assert_streamed_exports_match(checkpoint: Path, root: Path) -> None:
    """``export hf`` (one file, then shards of :data:`SMALL_SHARDS`) and ``export native`` of ``checkpoint``,
    streamed, give the bytes of the model ``load_model`` rebuilds written by the in-memory writers."""
    root.mkdir(parents=True, exist_ok=True)
    config, pm, _ = checkpoint_job(checkpoint)
    assert streams_tensors(pm), f"plugins {config.plugins} keep this export on the model-building path"
    model = load_model(checkpoint)[0]
    for max_shard_bytes in (None, SMALL_SHARDS):
        out = root / f"streamed_hf_{max_shard_bytes}"
        written = export_hf(checkpoint, out, max_shard_bytes=max_shard_bytes)
        reference = root / f"reference_hf_{max_shard_bytes}"
        reference_hf_folder(model, reference, max_shard_bytes or 5 * 1024**3)
        _assert_same_files(out, reference)
        assert sorted(written) == sorted(_files(out))
        shards = [name for name in written if name.endswith(".safetensors")]
        assert (len(shards) > 1) == (max_shard_bytes is not None), written
        assert json.loads((out / "export.json").read_text())["files"] == written
    written = export_native(checkpoint, root / "streamed_native")
    reference_native_file(model, root / "reference.safetensors")
    ours = (root / "streamed_native" / "model.safetensors").read_bytes()
    assert ours == (root / "reference.safetensors").read_bytes()
    assert yaml.safe_load((root / "streamed_native" / "config.yaml").read_text()) == config.to_dict()
    assert written[:2] == ["model.safetensors", "config.yaml"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_exports_are_byte_identical_to_the_in_memory_ones(tmp_path: Path, family: str) -> None:
    """All six families (llama with tied embeddings), one file and several shards, hf and native."""
    extra = {"tie_word_embeddings": True} if family == "llama" else {}
    assert_streamed_exports_match(_checkpoint(tmp_path, family, **extra), tmp_path)


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


def test_streamed_export_of_a_checkpoint_for_another_model_names_the_tensor(tmp_path: Path) -> None:
    """A job config whose model does not match the checkpoint's tensors: one line naming the tensor and both
    shapes, before any file is written."""
    _, folder = _saved(tmp_path, "qwen3_moe")
    loaded = load_pretrained(folder)
    config = dataclasses.replace(loaded.config, moe=dataclasses.replace(loaded.config.moe, expert_hidden=12))
    checkpoint = _save(tmp_path, loaded.model.state_dict(), config)
    with pytest.raises(
        CheckpointFormatError,
        match=r"'layers.0.ffn.experts.gate_up_proj' should be \(4, 2, 12, 32\), found shape \(4, 2, 24, 32\)",
    ):
        export_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_streamed_export_of_a_model_the_family_cannot_hold_leaves_nothing(tmp_path: Path) -> None:
    """A job whose model has no Hugging Face form (capacity-limited routing) is refused with the config field, as
    before streaming, and neither the output nor the staging folder is left behind."""
    _, folder = _saved(tmp_path, "qwen3_moe")
    loaded = load_pretrained(folder)
    config = dataclasses.replace(
        loaded.config, moe=dataclasses.replace(loaded.config.moe, capacity_factor=1.25)
    )
    checkpoint = _save(tmp_path, loaded.model.state_dict(), config)
    with pytest.raises(HFConfigError, match="'moe.capacity_factor': got 1.25"):
        export_hf(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_qwen3_moe", "run"]


def test_streamed_export_reads_each_model_tensor_once_and_no_optimizer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes read from the checkpoint's ``.distcp`` files by ``export hf``: the model's tensors once each (plus DCP's
    per-item framing, < 8 KiB an item), none of the optimizer moments saved beside them (twice the model here)."""
    _, folder = _saved(tmp_path, "qwen3_moe")
    loaded = load_pretrained(folder)
    state = loaded.model.state_dict()
    optim = {f"{k}.{m}": torch.randn_like(v) for k, v in state.items() for m in ("exp_avg", "exp_avg_sq")}
    job = loaded.config.to_dict()
    job["data"]["seq_len"] = loaded.config.model.max_seq_len
    checkpoint = CheckpointStore(tmp_path / "run" / "checkpoints").save(
        1, {"model": state, "optim": optim}, {"config": job, "world_size": 1}, {}
    )
    counters: list[list[int]] = []

    class CountingTensors(export.CheckpointTensors):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            counters.append(count_reads(self))

    monkeypatch.setattr(export, "CheckpointTensors", CountingTensors)
    export_hf(checkpoint, tmp_path / "out")
    model_bytes = sum(v.nbytes for v in state.values())
    read = sum(c[0] for c in counters)
    assert model_bytes <= read < model_bytes + 8192 * len(state), (read, model_bytes)
