"""The same job in different parallel layouts trains the same model: losses and step-1 gradients agree.

Every layout runs the real trainer (``Trainer.build`` / ``run``) on spawned gloo ranks with the same model, the same
initial weights and the same global batch (the same samples in the same order; one rank gets there by gradient
accumulation over micro-batches of one sequence, as the others do). Aux losses are per micro-batch, the LM loss is
normalised by the global count of loss tokens, dropout is 0.

Gradients are read through the ``expertrain_after_backward`` hook by a small in-process plugin (full tensors
gathered from DTensors).

Tolerances (fp32): step-1 gradients to 1e-5 relative (sums over ranks and experts reorder floating-point additions);
losses over 5 steps to 1e-3 relative (Adam divides by sqrt of tiny second moments and amplifies round-off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from framework.hooks.markers import hookimpl
from framework.observe.metrics import read_metrics
from tests.distributed.spawn import run_ranks
from tests.integration.launch import QUICKSTART, TINY

STEPS = 5
COMMON = (
    f"train.steps={STEPS}",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.sample_tokens=0",
    "checkpoint.save_final=false",
    "logging.plots=false",
    "logging.progress=false",
    "moe.aux_loss_coef=0.01",
    "moe.z_loss_coef=0.001",
    "data.val_fraction=0",  # no evaluation: the runs compare training only
)
# The first test of each world size trains all its layouts (one spawn): allow for a slow shared machine.
pytestmark = pytest.mark.timeout(600)


class GradCapture:
    """Keeps step 1's full gradients (gathered on every rank: a collective, so every rank calls it)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    @hookimpl
    def expertrain_after_backward(self, step: int, model: torch.nn.Module, config: Any) -> None:
        if step != 1:
            return
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            self.grads[name] = g.detach().clone()


def _train_once(rank: int, world: int, run_dir: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(str(QUICKSTART), [*TINY, *COMMON, f"run.dir={run_dir}", *overrides])
    capture = GradCapture()
    pm.register_object("grad-capture", capture)
    torch.manual_seed(config.train.seed + rank)
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, torch.device("cpu")))
    trainer.build()
    trainer.run()
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    return {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "grads": capture.grads if rank == 0 else {},
    }


def _train_layouts(
    rank: int, world: int, root: str, layouts: dict[str, tuple[str, ...]]
) -> dict[str, dict[str, Any] | str]:
    """Train every layout in turn on the same ranks (one spawn: imports and data preparation are paid once).
    A layout that fails reports its traceback instead of stopping the others."""
    import traceback

    import torch.distributed as dist

    out: dict[str, dict[str, Any] | str] = {}
    for name, overrides in layouts.items():
        try:
            out[name] = _train_once(rank, world, str(Path(root) / name), overrides)
        except Exception:  # noqa: BLE001 - reported per layout
            out[name] = traceback.format_exc()
            dist.barrier()  # the layouts after this one start together; a failed collective has timed out by now
    return out


def _run(tmp_path: Path, name: str, world: int, overrides: tuple[str, ...]) -> dict[str, Any]:
    result = run_ranks(_train_layouts, world, str(tmp_path), {name: overrides}, timeout=240)[0][name]
    assert isinstance(result, dict), result
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("ref"), "single", 1, ())


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
        "tp2-ep2": (FSDP, "parallel.tp=2", "parallel.ep=2"),
        "tp2-ep2-etp1": (FSDP, "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"),
    },
}


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, Any]]:
    """Results of every layout of one world size, trained in one spawn the first time they are asked for."""
    cache: dict[int, dict[str, Any]] = {}

    def get(world: int) -> dict[str, Any]:
        if world not in cache:
            root = tmp_path_factory.mktemp(f"world{world}")
            cache[world] = run_ranks(_train_layouts, world, str(root), LAYOUTS[world], timeout=600)[0]
        return cache[world]

    return get


@pytest.mark.parametrize(
    "world, layout",
    [(world, name) for world, group in LAYOUTS.items() for name in group],
    ids=[name for group in LAYOUTS.values() for name in group],
)
def test_layout_matches_single_rank(
    world: int, layout: str, layout_results: Callable[[int], dict[str, Any]], reference: dict[str, Any]
) -> None:
    result = layout_results(world)[layout]
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
    pm.register_object("crash", CrashAt(4))
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, torch.device("cpu")))
    trainer.build()
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def test_checkpoint_reshards_from_ep2_to_ep1_and_dp2(reference: dict[str, Any], tmp_path: Path) -> None:
    """Save at ep=2 (step 3), resume on one rank and at dp=2: steps 4-5 match the uninterrupted run."""
    import shutil

    saved = tmp_path / "ep2"
    ckpt = ("checkpoint.every=3", "parallel.data=fsdp")
    names = run_ranks(_train_until_crash, 2, str(saved), (*ckpt, "parallel.ep=2"), timeout=240)[0]
    assert "step_00000003" in names
    for name, world in (("resumed-ep1", 1), ("resumed-dp2", 2)):
        shutil.copytree(saved, tmp_path / name)
        result = _run(tmp_path, name, world, ckpt)
        assert len(result["losses"]) == STEPS  # steps 1-3 kept from the saved run, 4-5 trained after resuming
        torch.testing.assert_close(
            torch.tensor(result["losses"][3:]), torch.tensor(reference["losses"][3:]), rtol=1e-3, atol=0
        )
