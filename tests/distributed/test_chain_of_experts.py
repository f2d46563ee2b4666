"""Chain-of-Experts trains the same model in every parallel layout: the real trainer on spawned gloo ranks.

The job (TINY model, 4 experts, top-2 as 2 iterations of top-1, one shared expert, aux-loss-free biases on, aux and
z losses on) is trained for 3 steps on one rank and on two ranks with expert parallelism (each rank holds 2 experts;
every iteration is one all-to-all dispatch) and with tensor parallelism (each rank routes its sequence slice).
Tolerances are those of test_parallel_equivalence.py (fp32): losses to 1e-3 relative (Adam amplifies round-off from
reordered sums), step-1 gradients to 1e-5 relative / 1e-7 absolute.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed.layouts import register

STEPS = 3  # steps 2-3 route with the aux-loss-free biases that steps 1-2 moved
COE = (
    f"train.steps={STEPS}",
    "plugins=[chain_of_experts]",
    "moe.block=chain_of_experts",
    "chain_of_experts.iterations=2",
    "moe.shared_experts=1",
    "moe.bias_update_rate=0.01",
    "moe.route_norm=false",  # top-1 per iteration: gates keep their scores, so the routers get LM gradients too
)
FSDP = "parallel.data=fsdp"
LAYOUTS = {
    "coe-ep2": (*COE, FSDP, "parallel.ep=2"),
    "coe-tp2": (*COE, FSDP, "parallel.tp=2"),
}
register(1, {"coe-one": COE})
register(2, LAYOUTS)

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)


def _results(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    for name in names:
        assert isinstance(results[name], dict), f"{name} failed:\n{results[name]}"
    return {name: results[name] for name in names}


def test_expert_and_tensor_parallel_match_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    reference = _results(trained_layouts(1)[0], ["coe-one"])["coe-one"]
    # Router, bias and shared-expert parameters of both iterations exist and get gradients.
    assert {"layers.0.ffn.routers.1.gate.weight", "layers.0.ffn.shared_experts.down_proj.weight"} <= set(
        reference["grads"]
    )
    assert len(reference["losses"]) == STEPS

    for name, result in _results(trained_layouts(2)[0], list(LAYOUTS)).items():
        torch.testing.assert_close(
            torch.tensor(result["losses"]),
            torch.tensor(reference["losses"]),
            rtol=1e-3,
            atol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )
        assert result["grad_norms"][0] == pytest.approx(reference["grad_norms"][0], rel=1e-5), name
        assert set(result["grads"]) == set(reference["grads"]), name
        for param, ref in reference["grads"].items():
            torch.testing.assert_close(
                result["grads"][param],
                ref,
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, name=name, param=param: f"{name} {param}: {m}",
            )
