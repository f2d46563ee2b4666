"""LoRA with the real trainer on spawned gloo ranks: data (FSDP2), tensor (with expert tensor parallelism) and expert
parallelism train the same adapters as one rank — losses, step-1 gradients and the final adapter weights, read back
from each run's final checkpoint (which also checks that sharded adapters are saved whole).

The model has an MoE layer (0) and a dense layer (1): ``all-linear`` adapts attention (column- and row-parallel
projections) and the dense MLP, ``target_experts`` the routed experts (cut over ``ep``, sliced on their hidden
dimension under ``tp``). The LM head and the final norm are trained in full (``lora.modules_to_save``): vocab-sharded
under ``tp``, FSDP-sharded like any weight. The layouts train inside the shared per-world spawns (``layouts.py``).

Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative (sums over ranks reorder
additions), losses over 3 steps to 1e-3 relative (Adam amplifies round-off through tiny second moments); the final
adapters to 2e-6 absolute: warm-up steps move B from 0 to ~3e-3, so that is <0.1% of the change (measured: 1.5e-8
for dp2 and ep2, 2.6e-7 for tp2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.checkpoint.export import load_model
from plugins.peft.lora import adapter_parameter_names
from tests.distributed.layouts import assert_matches_one_rank, assert_tensors_close, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

LORA = (
    "plugins=[lora]",
    "moe.every=2",
    "lora.targets=all-linear",
    "lora.target_experts=true",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0",
    "lora.modules_to_save=[lm_head, norm]",
    "checkpoint.save_final=true",
)
SAVED = ("output.weight", "norm.weight")
FSDP = "parallel.data=fsdp"
LAYOUTS = {
    "lora-dp2": (*LORA, FSDP),
    "lora-tp2": (*LORA, FSDP, "parallel.tp=2"),
    "lora-ep2": (*LORA, FSDP, "parallel.ep=2"),
}
register(1, {"lora-one": LORA})
register(2, LAYOUTS)


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a run's final checkpoint: every adapter and the modules trained in full."""
    model, _, _, _ = load_model(run_dir)
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in [*adapter_parameter_names(model), *SAVED]}


def test_dp_tp_ep_train_the_same_adapters_as_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["lora-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    ref_adapters = _adapters(one_root / "lora-one")
    # Only adapters and the saved head and norm get gradients (the rest of the base is frozen); every kind of
    # adapted module is there.
    assert set(ref["grads"]) == set(ref_adapters)
    for part in (
        "attention.q_proj.lora",
        "attention.o_proj.lora",
        "ffn.down_proj.lora",
        "experts.lora_gate_up",
    ):
        assert any(part in n for n in ref_adapters), part
    assert all(torch.count_nonzero(t) > 0 for n, t in ref_adapters.items() if n.endswith("lora_B"))

    parallel, root = trained_layouts(2)
    for name in LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        adapters = _adapters(root / name)
        assert_tensors_close(name, adapters, ref_adapters)
