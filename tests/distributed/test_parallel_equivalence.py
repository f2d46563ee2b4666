"""The same job in different parallel layouts trains the same model: losses and step-1 gradients agree.

Every layout runs the real trainer (``Trainer.build`` / ``run``) on spawned gloo ranks with the same model, the same
initial weights and the same global batch (the same samples in the same order; one rank gets there by gradient
accumulation over micro-batches of one sequence, as the others do). Aux losses are per micro-batch, the LM loss is
normalised by the global count of loss tokens, dropout is 0.

Gradients are read through the ``expertrain_after_backward`` hook by a small in-process plugin (full tensors
gathered from DTensors).

Tolerances (fp32): step-1 gradients to 1e-5 relative (sums over ranks and experts reorder floating-point additions);
losses over 3 steps to 1e-3 relative (Adam divides by sqrt of tiny second moments and amplifies round-off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from framework.hooks.markers import hookimpl
from tests.distributed.layouts import COMMON, STEPS, register, train_layouts
from tests.distributed.spawn import run_ranks
from tests.integration.launch import QUICKSTART, TINY

# The first test of each world size trains every registered layout (one spawn, shared with the plugin tests through
# tests/distributed/layouts.py): allow for a slow shared machine.
pytestmark = pytest.mark.timeout(900)


def _run(tmp_path: Path, name: str, world: int, overrides: tuple[str, ...]) -> dict[str, Any]:
    result = run_ranks(train_layouts, world, str(tmp_path), {name: overrides}, timeout=240)[0][name]
    assert isinstance(result, dict), result
    return result


@pytest.fixture
def reference(trained_layouts: Callable[[int], tuple[dict[str, Any], Path]]) -> dict[str, Any]:
    result = trained_layouts(1)[0]["single"]
    assert isinstance(result, dict), f"the one-rank reference failed:\n{result}"
    return result


FSDP = "parallel.data=fsdp"
LAYOUTS: dict[int, dict[str, tuple[str, ...]]] = {
    2: {
        "dp2-fsdp": (FSDP,),
        "dp2-ddp": ("parallel.data=ddp",),
        "hsdp-2x1": (FSDP, "parallel.dp_replicate=2"),
        "ep2": (FSDP, "parallel.ep=2"),
        "tp2": (FSDP, "parallel.tp=2"),
        "tp2-etp1": (FSDP, "parallel.tp=2", "parallel.etp=1"),
        "tp2-no-sp": (FSDP, "parallel.tp=2", "parallel.sequence_parallel=false"),
    },
    4: {
        "dp2-ep2": (FSDP, "parallel.ep=2"),
        "tp2-dp2": (FSDP, "parallel.tp=2"),
        # Keeps its final checkpoint for test_export_sharded.py.
        "tp2-ep2": (FSDP, "parallel.tp=2", "parallel.ep=2", "checkpoint.save_final=true"),
        "tp2-ep2-etp1": (FSDP, "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"),
    },
}
# The resharding test trains past its checkpoint for 2 steps, so the restored optimizer state moves a compared loss.
RESHARD_STEPS = 5
register(1, {"single": (), "single-5-steps": (f"train.steps={RESHARD_STEPS}",)})
for _world, _group in LAYOUTS.items():
    register(_world, _group)


@pytest.mark.parametrize(
    "world, layout",
    [(world, name) for world, group in LAYOUTS.items() for name in group],
    ids=[name for group in LAYOUTS.values() for name in group],
)
def test_layout_matches_single_rank(
    world: int,
    layout: str,
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
    reference: dict[str, Any],
) -> None:
    result = trained_layouts(world)[0][layout]
    assert isinstance(result, dict), f"{layout} failed:\n{result}"
    assert len(result["losses"]) == STEPS
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0
    )
    # The global gradient norm (what clipping uses) over every rank's shards, whatever their meshes.
    assert result["grad_norms"][0] == pytest.approx(reference["grad_norms"][0], rel=1e-5)
    assert set(result["grads"]) == set(reference["grads"])
    for name, ref in reference["grads"].items():
        torch.testing.assert_close(
            result["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


class CrashAt:
    """Stops the job at the start of ``step`` on every rank, as a killed job would stop (checkpoints stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def expertrain_step_begin(self, step: int, model: torch.nn.Module, optimizer: Any, config: Any) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"stopped at step {step}")


def _train_until_crash(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> list[str]:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(str(QUICKSTART), [*TINY, *COMMON, f"run.dir={run_dir}", *overrides])
    pm.register_object("crash", CrashAt(RESHARD_STEPS - 1))
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, torch.device("cpu")))
    trainer.build()
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def test_checkpoint_reshards_from_ep2_to_ep1_and_dp2(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]], tmp_path: Path
) -> None:
    """Save at ep=2 (step 3), resume on one rank and at dp=2: steps 4-5 match the uninterrupted run."""
    import shutil

    reference = trained_layouts(1)[0]["single-5-steps"]
    assert isinstance(reference, dict), f"the one-rank reference failed:\n{reference}"
    saved = tmp_path / "ep2"
    ckpt = (f"train.steps={RESHARD_STEPS}", "checkpoint.every=3", "parallel.data=fsdp")
    names = run_ranks(_train_until_crash, 2, str(saved), (*ckpt, "parallel.ep=2"), timeout=240)[0]
    assert "step_00000003" in names
    for name, world in (("resumed-ep1", 1), ("resumed-dp2", 2)):
        shutil.copytree(saved, tmp_path / name)
        result = _run(tmp_path, name, world, ckpt)
        # Steps 1-3 kept from the saved run, 4-5 trained after resuming.
        assert len(result["losses"]) == RESHARD_STEPS
        torch.testing.assert_close(
            torch.tensor(result["losses"][3:]), torch.tensor(reference["losses"][3:]), rtol=1e-3, atol=0
        )
