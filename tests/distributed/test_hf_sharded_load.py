"""Sharded Hugging Face load: on 4 gloo ranks each rank reads from the folder only the slices of each tensor it
holds, and the sharded model equals the one-process load bit for bit.

Folders: tiny random qwen3_moe (fused experts from per-expert keys, q/k norms), llama untied and tied (dense), and
deepseek_v3 (mla with interleaved RoPE rows reordered on load, a shared expert, a dense first layer, the router's
correction bias), saved by transformers itself. Each is loaded into our model placed by the real parallel functions
(:func:`~framework.parallel.parallelize.parallelize_model`: TP -> EP/ETP -> FSDP2) for every layout below, every
tensor first filled with NaN so that an element the loader misses cannot pass; every tensor is then gathered with
``full_tensor()`` and compared with ``torch.equal`` (a copy: no round-off to allow for). Two folders are also
loaded the trainer's way, ``model.init_from: hf:<folder>`` into a model assembled on the meta device
(:func:`~framework.train.assembly.assemble_model`), tied head included.

Bytes read (``HFReadStats.bytes_read``, the tensor data of the slices read): each rank must read at most
``folder_bytes / 4 + replicated_bytes``, where ``replicated_bytes`` sums (in full) the stored bytes of every tensor
that rank holds more than a quarter of (replicated over tp, a plain buffer, or an uneven FSDP2 shard). The read
is in fact exact: the bytes of the rank's own shards, nothing more (renames, stacked experts, fused halves, and the
RoPE row reordering, read as runs of consecutive rows even where FSDP2 cuts a head).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.shared_spawn import share

WORLD = 4
SEQ = 16
FSDP = {"data": "fsdp"}
MOE_LAYOUTS = {
    "fsdp4-ep2": {**FSDP, "ep": 2},
    "tp2-fsdp2-etp2": {**FSDP, "tp": 2},
    "tp2-ep2-etp2": {**FSDP, "tp": 2, "ep": 2},
}
DENSE_LAYOUTS = {"fsdp4": FSDP, "tp2-fsdp2": {**FSDP, "tp": 2}}
FEW_EXPERT_LAYOUTS = {"fsdp4": FSDP, "fsdp4-ep2": {**FSDP, "ep": 2}}
"""Two experts: over 4 FSDP ranks, and one per ep rank over 2 FSDP ranks (FSDP2 cuts a hidden dimension)."""
FOLDERS = {
    "qwen3_moe": ("qwen3_moe", {}, MOE_LAYOUTS),
    "llama": ("llama", {}, DENSE_LAYOUTS),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, DENSE_LAYOUTS),
    "deepseek_v3": ("deepseek_v3", {}, MOE_LAYOUTS),
    "qwen3_moe_2experts": ("qwen3_moe", {"num_experts": 2}, FEW_EXPERT_LAYOUTS),
}


ASSEMBLED = {"llama_tied": DENSE_LAYOUTS["tp2-fsdp2"], "deepseek_v3": MOE_LAYOUTS["tp2-ep2-etp2"]}
"""Folders also loaded the trainer's way: ``model.init_from: hf:<folder>`` into a model assembled on the meta device
(transforms, parallelisation, then only this rank's shards allocated), as a job builds it."""


def _load_sharded(folder: str, parallel: dict[str, Any], meshes: dict[str, Any]) -> dict[str, Any]:
    """Build the folder's model, place it on this rank's share of ``parallel``, NaN it, load; gather everything."""
    from framework.config.sections import ParallelConfig
    from framework.interop.hf import load_pretrained
    from framework.interop.hf.folders import load_hf_weights
    from framework.models import Transformer
    from framework.models.sharding import local_part
    from framework.parallel.mesh import ParallelLayout, build_meshes
    from framework.parallel.parallelize import parallelize_model

    whole = load_pretrained(folder)  # the folder's sections and validated plugins
    cfg = dataclasses.replace(whole.config, parallel=ParallelConfig(**parallel))
    model = Transformer(cfg.model, cfg.moe, whole.plugin_manager.registry)
    layout = ParallelLayout.from_config(cfg.parallel, WORLD, cfg.model, cfg.moe, SEQ)
    key = repr(sorted(parallel.items()))
    meshes[key] = meshes.get(key) or build_meshes(layout, torch.device("cpu"))
    parallelize_model(model, cfg, meshes[key], torch.device("cpu"))
    state = model.state_dict()
    with torch.no_grad():
        for value in state.values():
            local_part(value).fill_(math.nan)
    stats = load_hf_weights(model, folder)
    stored = [k for k in state if not (k == "output.weight" and cfg.model.tie_embeddings)]
    own = {k: local_part(state[k]).numel() * 4 for k in stored}  # the folders are fp32
    full = {k: state[k].numel() * 4 for k in stored}
    return {
        "params": _gathered(state),
        "bytes_read": stats.bytes_read,
        "folder_bytes": stats.folder_bytes,
        "own_bytes": sum(own.values()),
        "replicated_bytes": sum(full[k] for k in stored if own[k] * WORLD > full[k]),
    }


def _assembled(folder: str, parallel: dict[str, Any]) -> dict[str, Any]:
    """The job's model with ``model.init_from: hf:<folder>``, assembled from the meta device (keyed init, then the
    sharded load into the base tensors), gathered."""
    from framework.parallel.mesh import ParallelLayout, build_meshes
    from framework.train.assembly import assemble_model
    from framework.train.launch import load_job

    overrides = [f"model.init_from=hf:{folder}", f"data.seq_len={SEQ}", "train.global_batch_size=8"]
    config, pm = load_job("", [*overrides, *(f"parallel.{k}={v}" for k, v in parallel.items())])
    layout = ParallelLayout.from_config(config.parallel, WORLD, config.model, config.moe, SEQ)
    meshes = build_meshes(layout, torch.device("cpu"))
    assembled = assemble_model(config, pm, meshes, torch.device("cpu"), resuming=False)
    assert assembled.whole_on_every_rank is None, assembled.whole_on_every_rank
    return {"params": _gathered(assembled.raw.state_dict())}


def _gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole (a collective); kept on rank 0 only, the one whose results are compared."""
    from torch.distributed.tensor import DTensor

    whole = {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone() for k, v in state.items()}
    return whole if torch.distributed.get_rank() == 0 else {}


def _all_layouts(rank: int, world: int, folders: dict[str, str]) -> dict[str, dict[str, Any]]:
    meshes: dict[str, Any] = {}
    results = {
        f"{name}/{layout}": _load_sharded(folders[name], parallel, meshes)
        for name, (_, _, layouts) in FOLDERS.items()
        for layout, parallel in layouts.items()
    }
    results.update({f"{name}/assembled": _assembled(folders[name], p) for name, p in ASSEMBLED.items()})
    return results


def _folders_and_layouts(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0 saves the folders (transformers is imported there only, not at the module's top: each spawned rank
    imports this module), then every rank loads them in every layout."""
    folders = {name: Path(root) / name / f"hf_{family}" for name, (family, _, _) in FOLDERS.items()}
    if rank == 0:
        from tests.unit.interop.test_hf_families import _saved

        for name, (family, extra, _) in FOLDERS.items():
            (Path(root) / name).mkdir()
            assert _saved(Path(root) / name, family, **extra)[1] == folders[name]
    torch.distributed.barrier()
    return {"folders": folders, "layouts": _all_layouts(rank, world, {k: str(v) for k, v in folders.items()})}


if importlib.util.find_spec("transformers") is not None:  # the tests skip without it
    share(WORLD, "hf_sharded_load", _folders_and_layouts, needs_folder=True)  # with the other 4-rank workers


@pytest.fixture(scope="module")
def _shared(shared_ranks: Callable[[int, str], list[Any]]) -> list[dict[str, Any]]:
    pytest.importorskip("transformers")
    return shared_ranks(WORLD, "hf_sharded_load")


@pytest.fixture(scope="module")
def folders(_shared: list[dict[str, Any]]) -> dict[str, Path]:
    return _shared[0]["folders"]


@pytest.fixture(scope="module")
def four_ranks(_shared: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
    return [rank["layouts"] for rank in _shared]


CASES = [f"{name}/{layout}" for name, (_, _, layouts) in FOLDERS.items() for layout in layouts]
"""Each folder at each of its layouts (byte counts are checked on these)."""


@pytest.fixture(scope="module")
def one_process(folders: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Each folder loaded whole into a plain model in this process (``load_pretrained``)."""
    from framework.interop.hf import load_pretrained

    return {name: load_pretrained(folder).model.state_dict() for name, folder in folders.items()}


@pytest.mark.parametrize("case", [*CASES, *(f"{name}/assembled" for name in ASSEMBLED)])
def test_sharded_load_equals_one_process_load_bit_for_bit(
    case: str, one_process: dict[str, dict[str, torch.Tensor]], four_ranks: list[dict[str, dict[str, Any]]]
) -> None:
    reference = one_process[case.split("/")[0]]
    got = four_ranks[0][case]["params"]
    assert got.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not different, f"{case}: {different[:5]}"


@pytest.mark.parametrize("case", CASES)
def test_each_rank_reads_only_its_own_slices_within_a_quarter_of_the_folder_plus_replicated(
    case: str, folders: dict[str, Path], four_ranks: list[dict[str, dict[str, Any]]]
) -> None:
    name = case.split("/")[0]
    tensors = load_file(str(folders[name] / "model.safetensors"))
    folder_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    for rank, results in enumerate(four_ranks):
        r = results[case]
        assert r["folder_bytes"] == folder_bytes
        bound = folder_bytes / WORLD + r["replicated_bytes"]
        assert r["bytes_read"] <= bound, f"{case} rank {rank}: read {r['bytes_read']} > bound {bound:.0f}"
        assert r["bytes_read"] == r["own_bytes"], f"{case} rank {rank}: not exactly its own slices"
