"""``save_pretrained`` of a live model sharded over 2 gloo ranks (FSDP2 with expert parallelism ep=2 for a
qwen3_moe folder, FSDP2 for a llama folder with a tied head) writes, from rank 0, the folder a whole model gives in
one process, byte for byte (several shard files, their index, config.json); the other rank writes nothing.

Each tensor is gathered whole one at a time (``full_tensor``), so no rank ever holds the whole model: the models
are loaded sharded from the folders (``load_hf_weights`` reads each rank's slices) and saved again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.shared_spawn import share

WORLD = 2
SEQ = 16
SMALL_SHARDS = 20_000
"""Bytes per shard file: several files for the tiny models (tensors of 1-12 KB)."""
CASES = {
    "qwen3_moe": ("qwen3_moe", {}, {"data": "fsdp", "ep": 2}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, {"data": "fsdp"}),
}


def _save_sharded(rank: int, world: int, folders: dict[str, str], out_root: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from framework.config.sections import ParallelConfig
    from framework.interop.hf import load_pretrained, save_pretrained
    from framework.interop.hf.folders import load_hf_weights
    from framework.models import Transformer
    from framework.parallel.mesh import ParallelLayout, build_meshes
    from framework.parallel.parallelize import parallelize_model

    results = {}
    for name, (_, _, parallel) in CASES.items():
        whole = load_pretrained(folders[name])
        cfg = dataclasses.replace(whole.config, parallel=ParallelConfig(**parallel))
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.moe, whole.plugin_manager.registry)
        layout = ParallelLayout.from_config(cfg.parallel, world, cfg.model, cfg.moe, SEQ)
        parallelize_model(model, cfg, build_meshes(layout, torch.device("cpu")), torch.device("cpu"))
        model.to_empty(device="cpu")
        model.init_weights(0)  # buffers (RoPE tables); the load overwrites every parameter
        load_hf_weights(model, folders[name])
        del whole
        sharded = sum(isinstance(v, DTensor) for v in model.state_dict().values())
        written = save_pretrained(model, Path(out_root) / name, max_shard_bytes=SMALL_SHARDS)
        results[name] = {"written": written, "sharded_tensors": sharded}
    return results


def _folders_then_save_sharded(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0 saves the HF folders (transformers is imported there only), then every rank saves them sharded."""
    folders = {name: Path(root) / name / f"hf_{family}" for name, (family, _, _) in CASES.items()}
    if rank == 0:
        from tests.unit.interop.test_hf_families import _saved

        for name, (family, extra, _) in CASES.items():
            (Path(root) / name).mkdir()
            assert _saved(Path(root) / name, family, **extra)[1] == folders[name]
    torch.distributed.barrier()
    out = Path(root) / "sharded"
    return {
        "folders": folders,
        "out": out,
        "saved": _save_sharded(rank, world, {k: str(v) for k, v in folders.items()}, str(out)),
    }


if importlib.util.find_spec("transformers") is not None:  # the test skips without it
    share(
        WORLD, "save_pretrained_sharded", _folders_then_save_sharded, needs_folder=True
    )  # with the 2-rank workers


def test_sharded_save_pretrained_writes_the_one_process_folder_from_rank_0(
    shared_ranks: Callable[[int, str], list[Any]], tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from framework.interop.hf import load_pretrained, save_pretrained

    shared = shared_ranks(WORLD, "save_pretrained_sharded")
    folders, out = shared[0]["folders"], shared[0]["out"]
    per_rank = [rank["saved"] for rank in shared]
    for name in CASES:
        reference = tmp_path / "one_process" / name
        expected = save_pretrained(
            load_pretrained(folders[name]).model, reference, max_shard_bytes=SMALL_SHARDS
        )
        assert per_rank[0][name]["sharded_tensors"] > 0, f"{name}: the model was not sharded"
        assert per_rank[0][name]["written"] == expected
        assert per_rank[1][name]["written"] == [], "rank 1 wrote files"
        assert len([f for f in expected if f.endswith(".safetensors")]) > 1, "expected several shard files"
        ours = {p.name: p.read_bytes() for p in (out / name).iterdir()}
        theirs = {p.name: p.read_bytes() for p in reference.iterdir()}
        assert sorted(ours) == sorted(theirs)
        different = [f for f in theirs if ours[f] != theirs[f]]
        assert not different, f"{name}: {different}"
