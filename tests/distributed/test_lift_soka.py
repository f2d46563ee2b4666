"""LIFT and SoKA with the real trainer on spawned gloo ranks: data parallelism (FSDP2 and DDP) trains the same model
as one rank — losses, step-1 gradients, and the final trained tensors read back from each run's final checkpoint.
LIFT refreshes its masks before step 3 (``lift.update_interval=2``), so the refresh (full weight gathered, mask
broadcast from rank 0, sharded moments remapped) runs under FSDP2 DTensors too; the masks must come out identical.
Tensor and expert parallelism are refused by both plugins (tests/unit/plugins/peft/test_lift.py, test_soka.py).

The model has an MoE layer (0) and a dense layer (1): ``all-linear`` takes attention and the dense MLP.
Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative (sums over ranks reorder
additions), losses over 5 steps to 1e-3 relative; final trained tensors to 2e-6 absolute (weights of order 0.02-1
moved by ~1e-3 per step).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.checkpoint.export import load_model
from plugins.peft import lift, soka
from tests.distributed.layouts import assert_matches_one_rank, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

COMMON = ("moe.every=2", "optim.weight_decay=0.1", "checkpoint.save_final=true")
LIFT = ("plugins=[lift]", "lift.r=2", "lift.filter_rank=4", "lift.update_interval=2", *COMMON)
SOKA = ("plugins=[soka]", "soka.max_rank=4", *COMMON)
LAYOUTS = {
    "lift-fsdp2": (*LIFT, "parallel.data=fsdp"),
    "lift-ddp2": (*LIFT, "parallel.data=ddp"),
    "soka-fsdp2": (*SOKA, "parallel.data=fsdp"),
}
register(1, {"lift-one": LIFT, "soka-one": SOKA})
register(2, LAYOUTS)


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every state tensor the methods own (LIFT: masks and values; SoKA: factors and ranks) and the weights."""
    model, _, _, _ = load_model(run_dir)
    keep = ("lift_", "soka_", ".weight")
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
