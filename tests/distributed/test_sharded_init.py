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
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from framework.parallel.mesh import ParallelLayout, build_meshes
from framework.train.assembly import assemble_model
from framework.train.launch import load_job
from tests.distributed.spawn import run_ranks
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
}


def _assemble(overrides: tuple[str, ...]) -> dict[str, Any]:
    config, pm = load_job(str(QUICKSTART), [*BASE, *overrides])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    meshes = build_meshes(layout, torch.device("cpu"))
    assembled = assemble_model(config, pm, meshes, torch.device("cpu"), resuming=False)
    whole: dict[str, torch.Tensor] = {}
    local_elements = 0
    for name, p in assembled.raw.named_parameters():
        local_elements += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        whole[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
    return {
        "params": whole,
        "local_elements": local_elements,
        "total_elements": sum(t.numel() for t in whole.values()),
        "whole_reason": assembled.whole_on_every_rank,
    }


def _on_ranks(rank: int, world: int) -> dict[str, Any]:
    return {name: _assemble(overrides) for name, overrides in LAYOUTS.items()}


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, Any]]:
    return {tied: _assemble(("model.tie_embeddings=true",) if tied else ()) for tied in (False, True)}


@pytest.fixture(scope="module")
def four_ranks() -> list[dict[str, Any]]:
    return run_ranks(_on_ranks, 4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_init_equals_one_rank_bit_for_bit(layout, one_process, four_ranks):
    reference = one_process["tied" in layout]["params"]
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
