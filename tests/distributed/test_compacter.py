"""Compacter with the real trainer on spawned gloo ranks: data parallelism (FSDP2 and DDP) trains the same adapters
(shared rules included) and norms as one rank — losses, step-1 gradients and the final trained tensors read back
from each run's final checkpoint. The layouts train inside the shared per-world spawns (``layouts.py``).

Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative, losses over 5 steps to 1e-3
relative; final trained tensors to 2e-6 absolute (values of order 0.1-1 moved by ~1e-4 per warm-up step;
measured 1.5e-8 for both).
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
LAYOUTS = {
    "compacter-fsdp2": (*COMPACTER, "parallel.data=fsdp"),
    "compacter-ddp2": (*COMPACTER, "parallel.data=ddp"),
}
register(1, {"compacter-one": COMPACTER})
register(2, LAYOUTS)


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    model, config, _, _ = load_model(run_dir)
    return {n: t.detach() for n, t in compacter.adapter_tensors(model, config).items()}


def test_data_parallel_trains_the_same_adapters_as_one_rank(
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
