"""The deepseek_moe block under the real trainer on spawned gloo ranks: expert parallelism (ep=2) and tensor
parallelism (tp=2) train the same model as one rank — losses, the device-level balance term and step-1 gradients.

The job is the tiny quickstart model with ``plugins=[deepseek_moe]``: 4 experts of hidden 32, top-2, split in 2 with
2 isolated shared experts -> 6 routed experts of hidden 16, top-2, shared hidden 32, in DeepSeek-V3 mode (sigmoid
scores, aux-loss-free bias, group-limited routing, route scale, a dense first layer) with every balance term on at
once: expert-level, sequence-wise, z-loss and device-level (over 2 fixed device groups, so the objective does not
depend on the layout).

Tolerances are those of ``tests/distributed/test_parallel_equivalence.py`` (fp32): step-1 gradients to 1e-5 relative
(sums over ranks reorder floating-point additions), losses over 3 steps to 1e-3 relative (Adam amplifies round-off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.observe.metrics import read_metrics
from tests.distributed.layouts import STEPS, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

JOB = (
    "plugins=[deepseek_moe]",
    "moe.block=deepseek_moe",
    "deepseek_moe.segments=2",
    "moe.shared_experts=2",
    "deepseek_moe.device_aux_loss_coef=0.05",
    "deepseek_moe.devices=2",
    "moe.score_func=sigmoid",
    "moe.bias_update_rate=0.01",  # 10x V3: bias steps big enough to change some choices within 3 steps
    "moe.seq_aux_loss_coef=0.001",
    "moe.n_groups=2",
    "moe.topk_groups=1",
    "moe.route_scale=2.5",
    "moe.first_k_dense=1",
)
FSDP = "parallel.data=fsdp"
LAYOUTS = {"deepseek-ep2": (*JOB, FSDP, "parallel.ep=2"), "deepseek-tp2": (*JOB, FSDP, "parallel.tp=2")}
register(1, {"deepseek-one": JOB})
register(2, LAYOUTS)
TERMS = ("load_balance", "seq_load_balance", "router_z", "device_balance")


def _aux(run_dir: Path, name: str) -> list[float]:
    return [r[f"loss/{name}"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_parallel_layouts_match_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["deepseek-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    assert any(".shared_experts." in n for n in ref["grads"]), "the shared experts are trained"
    parallel, root = trained_layouts(2)
    for name in LAYOUTS:
        got = parallel[name]
        assert isinstance(got, dict), f"{name} failed:\n{got}"
        assert len(got["losses"]) == STEPS
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-3, atol=0
        )
        assert got["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=1e-5)
        assert set(got["grads"]) == set(ref["grads"])
        for param, g in ref["grads"].items():
            torch.testing.assert_close(
                got["grads"][param], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name, p=param: f"{n} {p}: {m}"
            )
        # Every balance term (the device-level one included) is part of the objective and the same on every layout.
        for term in TERMS:
            ref_aux, got_aux = _aux(one_root / "deepseek-one", term), _aux(root / name, term)
            assert len(ref_aux) == STEPS and all(v > 0 for v in ref_aux), term
            torch.testing.assert_close(torch.tensor(got_aux), torch.tensor(ref_aux), rtol=1e-3, atol=0)

    # Exact counts over the 6 routed experts of the one MoE layer (the first of the 2 layers is dense): every token
    # of the global batch (4 sequences x 32) is routed top-2, counted by the rank that holds it.
    last = [r for r in read_metrics(root / "deepseek-ep2" / "metrics.jsonl") if "loss" in r][-1]
    routing = {k: v for k, v in last.items() if k.startswith("moe/layer")}
    assert {k.split("/")[1] for k in routing} == {"layer0"}
    assert sum(routing[f"moe/layer0/tokens_e{e}"] for e in range(6)) == 4 * 32 * 2
    assert "moe/layer0/tokens_e6" not in routing
