"""LIFT and SoKA with the real trainer on spawned gloo ranks: data parallelism (FSDP2 and DDP) trains the same model
as one rank — losses, step-1 gradients, and the final trained tensors read back from each run's final checkpoint.
LIFT refreshes its masks before step 3 (``lift.update_interval=2``), so the refresh (full weight gathered, mask
broadcast from rank 0, sharded moments remapped) runs under FSDP2 DTensors too; the masks must come out identical.

LIFT also trains the routed experts (``lift.target_experts``: a mask per expert and fused weight) under tensor
parallelism (``tp=2``: values whole on every rank, each rank writing the entries of its rows / columns; expert tensor
parallelism on the experts' hidden slices) and expert parallelism (``ep=2``: masks and values cut with their
experts), with a refresh before step 3, to the same model as one rank; ``expertrain export lift`` and ``export hf
--merge`` of those checkpoints match one rank's. (SoKA's tensor- and expert-parallel layouts: test_soka_parallel.py.)

The model has an MoE layer (0) and a dense layer (1): ``all-linear`` takes attention and the dense MLP.
Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative (sums over ranks reorder
additions), losses over 3 steps to 1e-3 relative; final trained tensors to 2e-6 absolute (weights of order 0.02-1
moved by ~1e-3 per step).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import export_hf, export_plugin_format, load_model
from plugins.peft import lift, soka
from tests.distributed.layouts import assert_matches_one_rank, assert_tensors_close, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

COMMON = ("moe.every=2", "optim.weight_decay=0.1", "checkpoint.save_final=true")
LIFT = ("plugins=[lift]", "lift.r=2", "lift.filter_rank=4", "lift.update_interval=2", *COMMON)
SOKA = ("plugins=[soka]", "soka.max_rank=4", *COMMON)
LAYOUTS = {
    "lift-fsdp2": (*LIFT, "parallel.data=fsdp"),
    "lift-ddp2": (*LIFT, "parallel.data=ddp"),
    "soka-fsdp2": (*SOKA, "parallel.data=fsdp"),
}
# LIFT with routed experts under tensor and expert parallelism (one-rank reference: lift-x-one). Every layer is MoE
# (what the Mixtral mapping of `export hf` takes); the attention projections are column- and row-parallel.
LIFT_X = (*LIFT, "moe.every=1", "lift.target_experts=true")
LIFT_X_LAYOUTS = {
    "lift-x-tp2": (*LIFT_X, "parallel.data=fsdp", "parallel.tp=2"),
    "lift-x-ep2": (*LIFT_X, "parallel.data=fsdp", "parallel.ep=2"),
}
register(1, {"lift-one": LIFT, "soka-one": SOKA, "lift-x-one": LIFT_X})
register(2, {**LAYOUTS, **LIFT_X_LAYOUTS})


def _trained(run_dir: Path, keep: tuple[str, ...] = ("lift_", "soka_", ".weight")) -> dict[str, torch.Tensor]:
    """Every state tensor the methods own (LIFT: masks and values; SoKA: factors and ranks) and the weights."""
    model, _, _, _ = load_model(run_dir)
    return {n: t.detach() for n, t in model.state_dict().items() if any(k in n for k in keep)}


@pytest.mark.parametrize("method", ["lift", "soka"])
def test_data_parallel_trains_the_same_model_as_one_rank(
    method: str, trained_layouts: Callable[[int], tuple[dict[str, Any], Path]]
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones[f"{method}-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    model, _, _, _ = load_model(one_root / f"{method}-one")
    names = lift.value_parameter_names(model) if method == "lift" else soka.factor_parameter_names(model)
    assert set(ref["grads"]) == set(names) and len(names) >= 7  # the method's tensors only, 7 modules or more
    ref_trained = _trained(one_root / f"{method}-one")

    parallel, root = trained_layouts(2)
    for name in (n for n in LAYOUTS if n.startswith(method)):
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        trained = _trained(root / name)
        assert set(trained) == set(ref_trained)
        for key, value in ref_trained.items():
            if key.endswith(("lift_index", "soka_rank")):
                assert torch.equal(trained[key], value), f"{name} {key}"
            else:
                torch.testing.assert_close(
                    trained[key], value, rtol=0, atol=2e-6, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
                )


def _lift_exports(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """``expertrain export lift`` and ``export hf --merge`` of the run's final checkpoint, prefixed by format."""
    export_plugin_format(run_dir, out / "lift", "lift")
    export_hf(run_dir, out / "hf", merge=True)
    tensors = {f"lift:{k}": v for k, v in load_file(str(out / "lift" / "lift_model.safetensors")).items()}
    tensors |= {f"hf:{k}": v for k, v in load_file(str(out / "hf" / "model.safetensors")).items()}
    return tensors


def test_lift_with_experts_under_tensor_and_expert_parallelism_matches_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]], tmp_path: Path
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["lift-x-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    model, _, _, _ = load_model(one_root / "lift-x-one")
    names = lift.value_parameter_names(model)
    # Values only get gradients: per layer 4 attention projections and 2 expert weights.
    assert set(ref["grads"]) == set(names) and len(names) == 2 * (4 + 2)
    assert "layers.0.ffn.experts.lift_gate_up_proj.lift_values" in names
    ref_trained = _trained(one_root / "lift-x-one", ("lift_", "weight", "_proj"))
    ref_exports = _lift_exports(one_root / "lift-x-one", tmp_path / "one")
    assert "lift:model.layers.0.mlp.experts.down_proj.lift_indices" in ref_exports
    assert any(k.startswith("hf:") and "experts" in k for k in ref_exports)

    parallel, root = trained_layouts(2)
    for name in LIFT_X_LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        trained = _trained(root / name, ("lift_", "weight", "_proj"))
        assert set(trained) == set(ref_trained)
        for key, value in ref_trained.items():
            if not value.is_floating_point():  # masks: the same entries, every expert and module
                assert torch.equal(trained[key], value), f"{name} {key}"
        floats = {k: v for k, v in ref_trained.items() if v.is_floating_point()}
        assert_tensors_close(name, {k: trained[k] for k in floats}, floats)
        exports = _lift_exports(root / name, tmp_path / name)
        assert set(exports) == set(ref_exports)
        for key, value in ref_exports.items():
            if value.is_floating_point():
                torch.testing.assert_close(
                    exports[key], value, rtol=0, atol=2e-6, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
                )
            else:  # exported mask indices
                assert torch.equal(exports[key], value), f"{name} {key}"
