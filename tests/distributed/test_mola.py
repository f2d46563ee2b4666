"""MoLA with the real trainer on spawned gloo ranks: expert parallelism trains the same adapters as one rank, the
base model stays frozen (no gradient, no optimizer state), and a run resumes its adapters from a checkpoint.

The model has an MoE layer (0) and a dense layer (1), so attention and dense MLP projections are adapted while the
routed experts are sharded over the expert-parallel ranks. Dropout is 0 (each rank would draw its own masks) and
the balance loss is on, so the routers get gradients from step 1.

Tolerances as in test_parallel_equivalence.py (fp32): step-1 gradients to 1e-5 relative (sums over ranks reorder
additions), losses over 5 steps to 1e-3 relative (Adam amplifies round-off through tiny second moments).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.hooks.markers import hookimpl
from framework.observe.metrics import read_metrics
from tests.distributed.layouts import COMMON, GradCapture
from tests.distributed.shared_spawn import share
from tests.distributed.test_parallel_equivalence import CrashAt
from tests.integration.launch import QUICKSTART, TINY

MOLA = (
    "plugins=[mola]",
    "moe.every=2",
    "mola.experts=[4, 3]",
    "mola.dropout=0",
    "mola.aux_loss_coef=0.001",
    "mola.targets=[q_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
    "train.steps=5",  # 3 compared steps, then a resume that trains 2 more
)
TOKENS_PER_STEP = 4 * 32  # global batch × seq_len (TINY)

pytestmark = pytest.mark.timeout(300)


class OptimizerProbe:
    """Names of the parameters that hold optimizer state after step 1, and of those the optimizer updates."""

    def __init__(self) -> None:
        self.with_state: set[str] = set()
        self.in_optimizer: set[str] = set()

    @hookimpl
    def expertrain_after_optimizer_step(self, step: int, model: torch.nn.Module, optimizer: Any) -> None:
        if step != 1:
            return
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in model.named_parameters():
            if id(p) in params:
                self.in_optimizer.add(name)
            if optimizer.state.get(p):
                self.with_state.add(name)


def _train(rank: int, world: int, run_dir: str, overrides: tuple[str, ...], crash_at: int) -> dict[str, Any]:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(str(QUICKSTART), [*TINY, *COMMON, f"run.dir={run_dir}", *MOLA, *overrides])
    grads, probe = GradCapture(), OptimizerProbe()
    pm.register_object("grad-capture", grads)
    pm.register_object("optimizer-probe", probe)
    if crash_at:
        pm.register_object("crash", CrashAt(crash_at))
    torch.manual_seed(config.train.seed + rank)
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, torch.device("cpu")))
    trainer.build()
    if crash_at:
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    else:
        trainer.run()
    result = {
        "grads": grads.grads if rank == 0 else {},
        "with_state": sorted(probe.with_state),
        "in_optimizer": sorted(probe.in_optimizer),
        "all_params": sorted(n for n, _ in trainer.raw_model.named_parameters()),
    }
    if not crash_at:
        records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
        result["losses"] = [r["loss"] for r in records]
        result["routed"] = [
            sum(v for k, v in r.items() if k.startswith("mola/layer1.down_proj/tokens_e")) for r in records
        ]
    return result


def _jobs(
    rank: int, world: int, root: str, jobs: list[tuple[str, tuple[str, ...], int]]
) -> list[dict[str, Any]]:
    """Run ``(run name, overrides, crash step or 0)`` jobs in turn on the same ranks (one spawn)."""
    return [_train(rank, world, str(Path(root) / name), overrides, crash) for name, overrides, crash in jobs]


share(1, "mola/reference", _jobs, [("single", (), 0)], needs_folder=True)  # with the one-rank layouts


@pytest.fixture(scope="module")
def reference(shared_ranks: Callable[[int, str], list[Any]]) -> dict[str, Any]:
    return shared_ranks(1, "mola/reference")[0][0]


def _ep2_stopped_and_resumed(rank: int, world: int, root: str) -> list[dict[str, Any]]:
    """One ep=2 run, stopped at the start of step 4 (checkpoint at step 3) and resumed: its steps 1-3 compare the
    layouts, its steps 4-5 the resume."""
    ep2 = ("parallel.data=fsdp", "parallel.ep=2", "checkpoint.every=3")
    return _jobs(rank, world, root, [("ep2", ep2, 4), ("ep2", ep2, 0)])


share(2, "mola/ep2", _ep2_stopped_and_resumed, needs_folder=True)  # one spawn with the other 2-rank workers


def test_ep2_trains_the_same_adapters_as_one_rank_and_resumes(
    reference: dict[str, Any], shared_ranks: Callable[[int, str], list[Any]]
) -> None:
    stopped, resumed = shared_ranks(2, "mola/ep2")[0]

    adapter = {n for n in reference["all_params"] if n.endswith(("router.weight", "lora_A", "lora_B"))}
    assert any(".ffn.gate_proj." in n for n in adapter)  # the dense layer's MLP is adapted
    assert not any(n.startswith("layers.0.ffn.") for n in adapter)  # the MoE layer's experts are not
    for run in (reference, stopped):
        # Only the adapters get gradients and optimizer state; every base weight is frozen.
        assert set(run["in_optimizer"]) == adapter
        assert set(run["with_state"]) == adapter
    assert set(reference["grads"]) == adapter == set(stopped["grads"])
    for name, ref in reference["grads"].items():
        torch.testing.assert_close(
            stopped["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )

    # Steps 1-3 from the stopped run, 4-5 trained after resuming from its step-3 checkpoint (adapters restored).
    assert len(resumed["losses"]) == 5
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0
    )
    # Routing counts are exact and summed over both ranks: every token picks top-2 of the dense down_proj's experts.
    assert reference["routed"] == resumed["routed"] == [2 * TOKENS_PER_STEP] * 5
