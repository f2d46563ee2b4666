"""Compacter with the real trainer on spawned gloo ranks: data parallelism (FSDP2 and DDP), tensor parallelism (with
and without sequence parallelism) and expert parallelism train the same adapters (shared rules included) and norms
as one rank — losses, step-1 gradients and the final trained tensors read back from each run's final checkpoint.

The model has an MoE layer (0) and a dense layer (1), so under tensor parallelism the adapters follow attention's
row-parallel output, the dense MLP's and the MoE block's, each ``Shard(1)`` (sequence-parallel: every rank its own
tokens, the adapter gradients summed over ``tp``) or ``Replicate()`` (every rank the same tokens, the gradients not
summed: a sum would double them, which the step-1 gradients catch). The layouts train inside the shared per-world
spawns (``layouts.py``).

Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative, losses over 3 steps to 1e-3
relative; final trained tensors to 2e-6 absolute (values of order 0.1-1 moved by ~1e-4 per warm-up step;
measured 1.5e-8 for dp2, see the test for tp and ep).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.checkpoint.export import load_model
from plugins.peft import compacter
from tests.distributed.layouts import assert_matches_one_rank, assert_tensors_close, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

COMPACTER = (
    "plugins=[compacter]",
    "moe.every=2",
    "compacter.reduction_factor=8",
    "checkpoint.save_final=true",
)
FSDP = "parallel.data=fsdp"
LAYOUTS = {
    "compacter-fsdp2": (*COMPACTER, FSDP),
    "compacter-ddp2": (*COMPACTER, "parallel.data=ddp"),
    "compacter-tp2": (*COMPACTER, FSDP, "parallel.tp=2", "parallel.sequence_parallel=true"),
    "compacter-tp2-nosp": (*COMPACTER, FSDP, "parallel.tp=2", "parallel.sequence_parallel=false"),
    "compacter-ep2": (*COMPACTER, FSDP, "parallel.ep=2"),
}
register(1, {"compacter-one": COMPACTER})
register(2, LAYOUTS)


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    model, config, _, _ = load_model(run_dir)
    return {n: t.detach() for n, t in compacter.adapter_tensors(model, config).items()}


def test_dp_tp_ep_train_the_same_adapters_as_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["compacter-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    ref_trained = _trained(one_root / "compacter-one")
    # Only adapters, the shared rules and the norms get gradients; every adapter kind is there.
    assert set(ref["grads"]) == set(ref_trained)
    assert {"compacter_rules.rules", "layers.0.attention_adapter.up.s", "layers.1.ffn_adapter.down.t"} <= set(
        ref_trained
    )

    parallel, root = trained_layouts(2)
    for name in LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        trained = _trained(root / name)
        assert_tensors_close(name, trained, ref_trained)
