"""LIFT, SoKA and CorDA build on the meta device: their transforms only change structure, and the weight-dependent
work (LIFT's rank-r SVD masks, SoKA's Kronecker SVD, CorDA's covariance-oriented SVD) runs on the materialised,
sharded model (``framework/train/assembly.py``).

Reference: one process assembling the same job through the whole-model order (every weight materialised and
initialised before the transforms), forced by a plugin whose transform declares it reads weights. On 4 gloo ranks
each job is assembled from the meta device for FSDP over 4 ranks (uneven and empty shards of the small factors) and
tp=2 x ep=2 (expert tensor parallelism on the experts' hidden slices, FSDP over tp-sharded weights); every parameter
and buffer (LIFT's masks, SoKA's initial factors and ranks, CorDA's ``B₀`` / ``A₀``), gathered whole, must equal the
reference bit for bit: the base values are keyed (a function of seed, name and index on every layout) and each
decomposition gathers the whole weight and computes what one process computes (LIFT's masks are broadcast from
rank 0). CorDA then calibrates (``calibrate_and_init``) on the same token batch on every
rank: its residual bases, adapters and ``B₀`` / ``A₀`` match to 1e-6 absolute, the bound of
tests/distributed/test_corda.py (each layout sums the calibration covariances in another order; the fp64
decomposition of covariances ~1e-7 apart moves the fp32 factors by less than that).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from framework.hooks.markers import hookimpl
from framework.parallel.mesh import ParallelLayout, build_meshes
from framework.train.assembly import assemble_model
from framework.train.launch import load_job
from plugins.peft import lift, soka
from plugins.peft.corda import calibrate_and_init
from tests.distributed.shared_spawn import share
from tests.integration.launch import QUICKSTART, TINY

JOBS = {
    "lift": ("plugins=[lift]", "lift.r=2", "lift.filter_rank=4", "lift.target_experts=true"),
    "soka": ("plugins=[soka]", "soka.max_rank=4", "soka.target_experts=true"),
    "corda": ("plugins=[corda]", "corda.r=4", "corda.target_experts=true"),
}
LAYOUTS = {
    "fsdp4": ("parallel.data=fsdp",),
    "tp2-ep2": ("parallel.data=fsdp", "parallel.tp=2", "parallel.ep=2"),
}
CORDA_ATOL = 1e-6


class ReadsWeights:
    """A plugin whose transform reads the base weights (it implements no ``expertrain_init_weights``): the assembly
    then materialises and initialises the whole model before any transform, the order every plugin had before the
    meta-device build."""

    @hookimpl
    def expertrain_transform_model(self, model: nn.Module) -> None:
        assert not any(p.is_meta for p in model.parameters())


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (a replicated DTensor's ``full_tensor()`` is its local tensor, not a copy)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t.detach()).clone()


def _assemble(job: str, overrides: tuple[str, ...], whole_first: bool = False) -> dict[str, Any]:
    """The job's model assembled on this process's ranks: every parameter and buffer gathered whole (after CorDA's
    calibration for ``corda``), and why the model was built whole (``None``: from the meta device)."""
    config, pm = load_job(str(QUICKSTART), [*TINY, "moe.every=2", *JOBS[job], *overrides])
    if whole_first:
        pm.register_object("reads-weights", ReadsWeights())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    meshes = build_meshes(layout, torch.device("cpu"))
    assembled = assemble_model(config, pm, meshes, torch.device("cpu"), resuming=False)
    model = assembled.raw
    out = {"assembled": {n: _whole(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}}
    if job == "corda":
        ids = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        calibrate_and_init(model, list(ids.split(1)), config.corda)
        out["calibrated"] = {n: _whole(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return {**out, "whole_reason": assembled.whole_on_every_rank}


def _on_ranks(rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {f"{job}-{name}": _assemble(job, overrides) for job in JOBS for name, overrides in LAYOUTS.items()}


share(4, "sharded_init_plugins", _on_ranks)  # one spawn with the other modules' 4-rank workers


@pytest.fixture(scope="module")
def whole_first() -> dict[str, dict[str, Any]]:
    return {job: _assemble(job, (), whole_first=True) for job in JOBS}


@pytest.fixture(scope="module")
def four_ranks(shared_ranks: Callable[[int, str], list[Any]]) -> list[dict[str, dict[str, Any]]]:
    return shared_ranks(4, "sharded_init_plugins")


@pytest.mark.parametrize("job", list(JOBS))
def test_the_plugin_transforms_on_the_meta_device(job: str) -> None:
    _, pm = load_job(str(QUICKSTART), [*TINY, *JOBS[job]])
    assert pm.transforms_needing_weights() == []


@pytest.mark.parametrize("job", list(JOBS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_assembly_equals_the_whole_model_order_bit_for_bit(job, layout, whole_first, four_ranks):
    reference = whole_first[job]
    assert reference["whole_reason"] is not None  # the reference did materialise the whole model first
    expected = reference["assembled"]
    for rank, results in enumerate(four_ranks):
        got = results[f"{job}-{layout}"]
        assert got["whole_reason"] is None, f"{job} {layout}: built whole ({got['whole_reason']})"
        assert got["assembled"].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got["assembled"][name], value), f"{job} {layout} rank {rank}: {name}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_corda_calibrates_the_same_decomposition_on_sharded_layouts(layout, whole_first, four_ranks):
    expected = whole_first["corda"]["calibrated"]
    changed = [n for n, v in expected.items() if not torch.equal(v, whole_first["corda"]["assembled"][n])]
    assert any("lora_A0" in n for n in changed) and any("experts.gate_up_proj" in n for n in changed)
    for rank, results in enumerate(four_ranks):
        got = results[f"corda-{layout}"]["calibrated"]
        for name, value in expected.items():
            where = f"{layout} rank {rank} {name}"
            torch.testing.assert_close(
                got[name], value, rtol=0, atol=CORDA_ATOL, msg=lambda m, w=where: f"{w}: {m}"
            )


def test_the_reference_masks_and_factors_are_those_of_the_base_weights(whole_first) -> None:
    """The reference itself, against the methods' math applied to the plain base (no plugin, same seed): LIFT's
    masks are the top-K of the rank-k SVD of each weight, SoKA's factors its principal Kronecker terms and its
    weight the residual (exact: the same fp64 computation on the same values)."""
    config, pm = load_job(str(QUICKSTART), [*TINY, "moe.every=2"])
    from framework.models import Transformer
    from framework.models.init import KeyedInit

    with torch.device("meta"):
        base = Transformer(config.model, config.moe, pm.registry)
    base.to_empty(device="cpu")
    base.init_weights(KeyedInit.for_model(config.train.seed, base))
    weights = dict(base.named_parameters())

    lifted = whole_first["lift"]["assembled"]
    q, experts = "layers.1.attention.q_proj", "layers.0.ffn.experts"
    w_q = weights[f"{q}.weight"]
    K = lifted[f"{q}.lift_index"].numel()
    assert torch.equal(lifted[f"{q}.lift_index"], lift.principal_mask(w_q, K, 4))
    gate_up = weights[f"{experts}.gate_up_proj"].flatten(1, 2)
    K = lifted[f"{experts}.lift_gate_up_proj.lift_index"].shape[-1]
    assert torch.equal(lifted[f"{experts}.lift_gate_up_proj.lift_index"], lift.principal_mask(gate_up, K, 4))

    kron = whole_first["soka"]["assembled"]
    m1, n1 = soka.kron_factors(w_q.shape[0])[0], soka.kron_factors(w_q.shape[1])[0]
    A, B, rank = soka.principal_terms(w_q, m1, n1, 0.9, 4, True)
    assert torch.equal(kron[f"{q}.soka_A0"], A.float()) and torch.equal(kron[f"{q}.soka_B0"], B.float())
    assert int(kron[f"{q}.soka_rank"]) == int(rank)
    assert torch.equal(kron[f"{q}.weight"], (w_q.double() - soka.kron_sum(A, B)).float())
