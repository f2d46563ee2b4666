"""CorDA with the real trainer on spawned gloo ranks: data parallelism (FSDP2, and DDP) calibrates the same
decomposition (every rank runs the same calibration samples, so no collective is needed) and trains the same
adapters as one rank: losses, step-1 gradients and the final adapters and residual bases, read back from each
run's final checkpoint. Tensor and expert parallelism are refused at validation (tested in the unit tests).

The model has an MoE layer (0) and a dense layer (1): ``all-linear`` adapts attention and the dense MLP.
Tolerances as in test_lora.py (fp32): step-1 gradients 1e-5 relative, losses over 5 steps 1e-3 relative, final
adapters 2e-6 absolute; residual bases are computed once before training and frozen: 1e-6 absolute (the FSDP
forward reorders the calibration sums; the fp64 decomposition of an fp32 covariance differs by ~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.checkpoint.export import load_model
from plugins.peft.corda import corda_modules
from tests.distributed.layouts import assert_matches_one_rank, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

CORDA = (
    "plugins=[corda]",
    "moe.every=2",
    "corda.targets=all-linear",
    "corda.r=4",
    "corda.alpha=8",
    "corda.calibration_samples=4",
    "checkpoint.save_final=true",
)
LAYOUTS = {
    "corda-dp2-fsdp": (*CORDA, "parallel.data=fsdp"),
    "corda-dp2-ddp": (*CORDA, "parallel.data=ddp"),
}
register(1, {"corda-one": CORDA})
register(2, LAYOUTS)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _, _ = load_model(run_dir)
    out: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        for name, t in (("weight", m.weight), ("A", m.lora.lora_A), ("B", m.lora.lora_B), ("A0", m.lora_A0)):
            out[f"{path}.{name}"] = t.detach()
    return out


def test_data_parallel_calibrates_and_trains_the_same_as_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["corda-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    ref_state = _state(one_root / "corda-one")
    assert any("ffn.down_proj" in n for n in ref_state) and any("attention.o_proj" in n for n in ref_state)
    assert all("lora" in n for n in ref["grads"])  # only the adapters get gradients

    parallel, root = trained_layouts(2)
    for name in LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        state = _state(root / name)
        assert set(state) == set(ref_state)
        for key, t in ref_state.items():
            atol = 1e-6 if key.endswith((".weight", ".A0")) else 2e-6
            torch.testing.assert_close(
                state[key], t, rtol=0, atol=atol, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
            )
