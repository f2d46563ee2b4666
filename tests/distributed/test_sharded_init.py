"""The model assembly allocates only this rank's shards, and every parameter starts with the values it has on one
rank, whatever the layout (``framework/train/assembly.py``, ``framework/models/init.py``).

On 4 gloo ranks, the job's model (dense and MoE layers, LoRA on every linear layer and on the routed experts, tied
and untied heads) is assembled for several layouts from the meta device; every parameter, gathered whole, must equal
the one-process assembly bit for bit (the values are a function of seed, name and index only, so there is no
round-off to allow for). Each rank must also hold only its shards: the elements it allocated are compared with the
whole model's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from framework.checkpoint.store import CheckpointStore
from framework.models.sharding import local_part
from framework.parallel.data_parallel import rescale_expert_gradients
from framework.parallel.mesh import ParallelLayout, build_meshes
from framework.train.assembly import assemble_model
from framework.train.launch import load_job
from tests.distributed.shared_spawn import share
from tests.integration.launch import QUICKSTART, TINY

BASE = (
    *TINY,
    "moe.every=2",
    "plugins=[lora]",
    "lora.targets=all-linear",
    "lora.target_experts=true",
    "lora.r=4",
    "lora.dropout=0",
)
LAYOUTS = {
    "fsdp4": ("parallel.data=fsdp",),
    "fsdp-ep2": ("parallel.data=fsdp", "parallel.ep=2"),
    "tp2-fsdp2-etp": ("parallel.data=fsdp", "parallel.tp=2"),
    "tp2-ep2": ("parallel.data=fsdp", "parallel.tp=2", "parallel.ep=2"),
    "tp2-ep2-tied": ("parallel.data=fsdp", "parallel.tp=2", "parallel.ep=2", "model.tie_embeddings=true"),
    "hsdp2x2": ("parallel.data=fsdp", "parallel.dp_replicate=2"),
    # Fewer local experts than FSDP ranks: 2 experts over 4 FSDP ranks, and 1 local expert (ep=2) over 2.
    "fsdp4-2experts": ("parallel.data=fsdp", "moe.num_experts=2"),
    "fsdp-ep2-2experts": ("parallel.data=fsdp", "parallel.ep=2", "moe.num_experts=2"),
}
REFERENCES = {"untied": (), "tied": ("model.tie_embeddings=true",), "2experts": ("moe.num_experts=2",)}
"""The one-process models the layouts are compared with."""


def _reference_of(layout: str) -> str:
    return next((name for name in ("tied", "2experts") if name in layout), "untied")


def _assemble_model(overrides: tuple[str, ...]) -> tuple[Any, Any, ParallelLayout]:
    config, pm = load_job(str(QUICKSTART), [*BASE, *overrides])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    meshes = build_meshes(layout, torch.device("cpu"))
    assembled = assemble_model(config, pm, meshes, torch.device("cpu"), resuming=False)
    return assembled, config, layout


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def _assemble(overrides: tuple[str, ...]) -> dict[str, Any]:
    assembled, config, layout = _assemble_model(overrides)
    whole: dict[str, torch.Tensor] = {}
    local_elements = 0
    expert_local: dict[str, int] = {}
    for name, p in assembled.raw.named_parameters():
        local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        local_elements += local
        if ".experts." in name:
            expert_local[name] = local
        whole[name] = _whole(p)
    return {
        "params": whole,
        "local_elements": local_elements,
        "expert_local_elements": expert_local,
        "total_elements": sum(t.numel() for t in whole.values()),
        "whole_reason": assembled.whole_on_every_rank,
        "grads": _step_gradients(assembled.raw, config, layout) if "moe.num_experts=2" in overrides else {},
    }


def _step_gradients(model: torch.nn.Module, config: Any, layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """Gradients of one next-token loss on the same fixed batch on every rank, gathered whole. Data-parallel ranks
    average identical gradients, so they equal the one-process gradients up to the order of the sums."""
    ids = torch.randint(
        0, config.model.vocab_size, (2, config.data.seq_len), generator=torch.Generator().manual_seed(0)
    )
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    rescale_expert_gradients(model, layout)
    return {name: _whole(p.grad) for name, p in model.named_parameters() if p.grad is not None}


def _dcp_between_few_expert_layouts(root: str) -> dict[str, Any]:
    """Save the ep=2 layout (one expert per ep rank, cut on a hidden dimension over 2 FSDP ranks) with the
    checkpoint store (DCP), load it into the ep=1 layout (cut over 4) after zeroing that: gathered whole."""
    saved, _, _ = _assemble_model(LAYOUTS["fsdp-ep2-2experts"])
    path = CheckpointStore(Path(root)).save(0, {"model": saved.raw.state_dict()}, {}, {})
    target, _, _ = _assemble_model(LAYOUTS["fsdp4-2experts"])
    state = target.raw.state_dict()
    with torch.no_grad():
        for value in state.values():
            local_part(value).zero_()
    CheckpointStore.load(path, {"model": state})
    return {"path": str(path), "params": {name: _whole(p) for name, p in target.raw.named_parameters()}}


def _on_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    results = {name: _assemble(overrides) for name, overrides in LAYOUTS.items()}
    results["dcp"] = _dcp_between_few_expert_layouts(root)
    return results


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, Any]]:
    return {name: _assemble(overrides) for name, overrides in REFERENCES.items()}


share(4, "sharded_init", _on_ranks, needs_folder=True)  # one spawn with the other modules' 4-rank workers


@pytest.fixture(scope="module")
def four_ranks(shared_ranks: Callable[[int, str], list[Any]]) -> list[dict[str, Any]]:
    return shared_ranks(4, "sharded_init")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_equals_one_rank_bit_for_bit(layout, one_process, four_ranks):
    reference = one_process[_reference_of(layout)]["params"]
    for rank, results in enumerate(four_ranks):
        got = results[layout]
        assert got["whole_reason"] is None  # built on meta: lora declares its init hook
        assert got["params"].keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(got["params"][name], value), f"{layout} rank {rank}: {name}"
    adapters = [n for n in reference if "lora_A" in n]
    assert adapters and all(reference[n].abs().sum() > 0 for n in adapters)  # A initialised, not left at zero


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_allocates_only_its_shards(layout, four_ranks):
    """Sharding over 4 ranks (FSDP, or FSDP × tp) leaves each rank about a quarter of the elements, HSDP's 2 shard
    ranks about half; the bound allows for uneven splits and the replicated small tensors (norms, routers under tp)."""
    share = 0.5 if layout.startswith("hsdp") else 0.25
    for results in four_ranks:
        got = results[layout]
        assert got["local_elements"] <= (share + 0.05) * got["total_elements"], layout


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "2experts" in name])
def test_fewer_local_experts_than_fsdp_ranks_gives_each_rank_a_quarter_of_every_expert_tensor(
    layout, four_ranks
):
    """2 experts over 4 FSDP ranks (and 1 local expert over 2 under ep=2): cut on dim 0, rank 0 would hold a whole
    expert (half of each tensor) and two ranks nothing; cut on a hidden dimension, every rank holds exactly a
    quarter of every expert tensor (LoRA's expert adapters included)."""
    for rank, results in enumerate(four_ranks):
        got = results[layout]
        assert got["expert_local_elements"], layout
        for name, local in got["expert_local_elements"].items():
            whole = got["params"][name].numel()
            assert local * 4 == whole, f"{layout} rank {rank}: {name} holds {local} of {whole}"


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "2experts" in name])
def test_fewer_local_experts_than_fsdp_ranks_give_the_one_process_gradients(layout, one_process, four_ranks):
    """One forward and backward through the hidden-dimension cut (FSDP2's all-gather and reduce-scatter on dim > 0):
    every gradient equals the one-process gradient to 1e-5 of its largest element (the sums over ranks and experts
    run in another order)."""
    reference = one_process["2experts"]["grads"]
    got = four_ranks[0][layout]["grads"]
    assert got.keys() == reference.keys() and any(".experts." in name for name in reference)
    for name, expected in reference.items():
        tolerance = 1e-5 * expected.abs().max().item() + 1e-12
        assert (got[name] - expected).abs().max().item() <= tolerance, f"{layout}: {name}"


def test_checkpoint_of_a_hidden_dimension_cut_reloads_into_another_layout_and_one_process(
    one_process, four_ranks
):
    """DCP: saved from the ep=2 layout (1 expert per ep rank, cut on a hidden dimension over 2 FSDP ranks), loaded
    into the ep=1 layout (cut over 4 ranks) and into one process, the values are the one-process values exactly."""
    reference = one_process["2experts"]["params"]
    for rank, results in enumerate(four_ranks):
        for name, value in reference.items():
            assert torch.equal(results["dcp"]["params"][name], value), f"rank {rank}: {name}"
    assembled, _, _ = _assemble_model(REFERENCES["2experts"])
    state = assembled.raw.state_dict()
    with torch.no_grad():
        for value in state.values():
            value.zero_()
    CheckpointStore.load(Path(four_ranks[0]["dcp"]["path"]), {"model": state})
    for name, value in reference.items():
        assert torch.equal(state[name], value), name
