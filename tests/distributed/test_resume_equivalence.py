"""Strict resume equivalence: a run resumed from its step-2 checkpoint holds the uninterrupted run's model and
optimizer state, tensor for tensor, not only its losses.

Every job trains 4 steps on spawned gloo ranks through the real trainer (``Trainer.build`` / ``run``) and saves at
steps 2 and 4. A copy of its run folder without step 4 is resumed: the job trains steps 3-4 again. A small
in-process plugin gathers the full state on every rank (DTensor shards gathered, whatever the layout): every model
tensor (parameters and buffers: the routers' expert biases, plugin masks), every parameter's AdamW ``exp_avg``,
``exp_avg_sq`` and ``step``, and every group's learning rate, at the start of step 3 (the state as loaded) and after
step 4.

- Same layout (every plugin, 2 ranks, ep=2 / fsdp=2 / tp=2): the same math on the same values, so the state at step 3,
  the state after step 4 and the losses of steps 3-4 are equal bit for bit (``torch.equal``).
- Resharded (saved at ep=2 on 2 ranks, resumed at tp=2 on 2 ranks and at tp=2 × ep=2 on 4 ranks): the state as
  loaded at step 3 is bit-exact (resharding copies values). Steps 3-4 then sum in another order (tp splits the
  matmuls' inner sums over ranks), so after step 4 every weight, exp_avg and exp_avg_sq tensor is within 1e-5 of its
  own largest magnitude (measured at most 1.7e-7, 3.9e-7 and 5.5e-7: fp32 round-off of two steps, amplified where
  Adam divides by the square root of a tiny second moment), the losses of steps 3-4 within 1e-6 relative (measured
  2.6e-8); the step counts and learning rates are exact.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from framework.hooks.markers import hookimpl
from framework.observe.metrics import read_metrics
from tests.distributed.layouts import COMMON
from tests.distributed.spawn import run_ranks
from tests.integration.launch import QUICKSTART, TINY

pytestmark = pytest.mark.timeout(600)

STEPS = 4
RESUME_STEP = 2
RUN = (
    f"train.steps={STEPS}",
    "checkpoint.every=2",
    "checkpoint.save_final=false",
    "moe.bias_update_rate=0.01",
)
FSDP = "parallel.data=fsdp"
EP2 = (FSDP, "parallel.ep=2")
PLUGINS: dict[str, tuple[str, ...]] = {
    "lora-ep2": (
        "plugins=[lora]",
        "moe.every=2",
        "lora.targets=all-linear",
        "lora.target_experts=true",
        "lora.r=4",
        "lora.dropout=0",
        *EP2,
    ),
    "hft-ep2": ("plugins=[hft]", "moe.every=2", "hft.stage_every=2", "optim.weight_decay=0.1", *EP2),
    "lift-ep2": (
        "plugins=[lift]",
        "lift.r=2",
        "lift.filter_rank=4",
        "lift.update_interval=2",  # a mask refresh before step 3: the first step after the resume
        "lift.target_experts=true",
        *EP2,
    ),
    "soka-fsdp2": ("plugins=[soka]", "moe.every=2", "soka.max_rank=4", FSDP),
    "corda-tp2": (
        "plugins=[corda]",
        "moe.every=2",
        "corda.targets=all-linear",
        "corda.target_experts=true",
        "corda.r=4",
        "corda.calibration_samples=4",
        FSDP,
        "parallel.tp=2",
    ),
    "compacter-fsdp2": ("plugins=[compacter]", "moe.every=2", "compacter.reduction_factor=8", FSDP),
    "deepseek_moe-ep2": (
        "plugins=[deepseek_moe]",
        "moe.block=deepseek_moe",
        "deepseek_moe.segments=2",
        "moe.shared_experts=2",
        "moe.score_func=sigmoid",
        *EP2,
    ),
    "chain_of_experts-ep2": (
        "plugins=[chain_of_experts]",
        "moe.block=chain_of_experts",
        "chain_of_experts.iterations=2",
        "moe.shared_experts=1",
        *EP2,
    ),
    "mola-ep2": (
        "plugins=[mola]",
        "moe.every=2",
        "mola.experts=[4, 3]",
        "mola.dropout=0",
        "mola.aux_loss_coef=0.001",
        *EP2,
    ),
}
BASE = "base-ep2"
RESHARD_TP2 = (FSDP, "parallel.ep=1", "parallel.tp=2")  # 2 ranks: resumed into tensor parallelism
RESHARD_4 = (FSDP, "parallel.tp=2", "parallel.ep=2")  # 4 ranks


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class StateCapture:
    """Every model tensor and AdamW state at the start of ``RESUME_STEP + 1`` and after the last step (gathering is a
    collective: every rank takes part, rank 0 keeps the result)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.steps: list[int] = []  # the steps this job trained: a resumed job must not start again from 1

    def _capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        out: dict[str, Any] = {f"model/{n}": _full(t) for n, t in model.state_dict().items()}
        for name, p in model.named_parameters():
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{name}/{key}"] = _full(value)
        out["lr"] = [g["lr"] for g in optimizer.param_groups]
        return out

    @hookimpl
    def expertrain_step_begin(self, step: int, model: torch.nn.Module, optimizer: Any, config: Any) -> None:
        self.steps.append(step)
        if step == RESUME_STEP + 1:
            self.states["loaded"] = self._capture(model, optimizer)

    @hookimpl
    def expertrain_after_optimizer_step(
        self, step: int, model: torch.nn.Module, optimizer: Any, config: Any
    ) -> None:
        if step == config.train.steps:
            self.states["final"] = self._capture(model, optimizer)


def _train(rank: int, world: int, run_dir: Path, overrides: tuple[str, ...]) -> dict[str, Any]:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(str(QUICKSTART), [*TINY, *COMMON, *RUN, f"run.dir={run_dir}", *overrides])
    capture = StateCapture()
    pm.register_object("state-capture", capture)
    torch.manual_seed(config.train.seed + rank)
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, torch.device("cpu")))
    try:
        trainer.build()
        trainer.run()
    finally:
        trainer.close()
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    return {**capture.states, "losses": losses, "steps": capture.steps} if rank == 0 else {}


def _resume_copy(rank: int, saved: Path, into: Path) -> None:
    """``saved``'s run folder as it was after step 2: step 4 left out, ``latest`` naming step 2."""
    if rank == 0:
        step = f"step_{RESUME_STEP:08d}"
        shutil.copytree(saved, into, ignore=lambda d, names: [n for n in names if n == f"step_{STEPS:08d}"])
        (into / "checkpoints" / "latest").write_text(step, encoding="utf-8")
    dist.barrier()


def _jobs(
    rank: int, world: int, root: str, jobs: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]]
) -> dict[str, Any]:
    """``{name: (saved run or "", job overrides, resume overrides or None)}``: with no saved run, train the job
    uninterrupted; with resume overrides, resume a copy of the saved (or just trained) run at step 2 with them on top
    of the job's."""
    out: dict[str, Any] = {}
    for name, (saved, job, resume) in jobs.items():
        full = Path(root) / name
        if not saved:
            out[name] = _train(rank, world, full, job)
        if resume is None:
            continue
        _resume_copy(rank, Path(saved) if saved else full, Path(root) / f"{name}-resumed")
        out[f"{name}-resumed"] = _train(rank, world, Path(root) / f"{name}-resumed", (*job, *resume))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("resume")
    jobs: dict[str, tuple[str, tuple[str, ...], tuple[str, ...] | None]] = {
        name: ("", job, ()) for name, job in PLUGINS.items()
    }
    jobs[BASE] = ("", EP2, None)  # the reference of the resharded resumes
    jobs["base-into-tp2"] = (str(root / BASE), EP2, RESHARD_TP2)
    return run_ranks(_jobs, 2, str(root), jobs, timeout=540)[0], root


def _assert_resumed(got: dict[str, Any], ref: dict[str, Any]) -> None:
    """The copy really resumed (a job that ignored the checkpoint and trained from step 1 would match as well)."""
    assert ref["steps"] == list(range(1, STEPS + 1)) and got["steps"] == list(
        range(RESUME_STEP + 1, STEPS + 1)
    )


def _assert_equal_states(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: {sorted(got.keys() ^ ref.keys())}"
    assert any(k.endswith("/exp_avg_sq") for k in ref) and any(k.endswith("/step") for k in ref)
    for key, value in ref.items():
        assert (value == got[key]) if key == "lr" else torch.equal(got[key], value), f"{what}: {key} differs"


@pytest.mark.parametrize("name", list(PLUGINS))
def test_plugin_resumed_through_the_trainer_equals_the_uninterrupted_run_bit_for_bit(
    name: str, two_ranks: tuple[dict[str, Any], Path]
) -> None:
    results, _ = two_ranks
    ref, got = results[name], results[f"{name}-resumed"]
    _assert_resumed(got, ref)
    _assert_equal_states(got["loaded"], ref["loaded"], f"{name} at the resume")
    _assert_equal_states(got["final"], ref["final"], f"{name} after step {STEPS}")
    assert got["losses"] == ref["losses"] and sorted(ref["losses"]) == list(range(1, STEPS + 1))


def _assert_close_states(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: {sorted(got.keys() ^ ref.keys())}"
    for key, value in ref.items():
        if key == "lr":
            assert got[key] == value, what
        elif key.endswith("/step"):
            assert torch.equal(got[key], value), f"{what}: {key}"
        else:
            error = (got[key].double() - value.double()).abs().max().item()
            scale = value.double().abs().max().item()
            assert error <= 1e-5 * scale, f"{what}: {key} off by {error:.3g} (largest magnitude {scale:.3g})"


def _assert_resharded_resume(got: dict[str, Any], ref: dict[str, Any], layout: str) -> None:
    _assert_resumed(got, ref)
    _assert_equal_states(got["loaded"], ref["loaded"], f"{layout} as loaded")
    _assert_close_states(got["final"], ref["final"], f"{layout} after step {STEPS}")
    assert sorted(got["losses"]) == sorted(ref["losses"])
    for step, loss in ref["losses"].items():
        assert got["losses"][step] == pytest.approx(loss, rel=1e-6), step


def test_resume_from_ep2_into_tp2_holds_the_saved_state_exactly(
    two_ranks: tuple[dict[str, Any], Path],
) -> None:
    results, _ = two_ranks
    _assert_resharded_resume(results["base-into-tp2-resumed"], results[BASE], "tp=2")


def test_resume_from_ep2_on_two_ranks_into_tp2_ep2_on_four_holds_the_saved_state_exactly(
    two_ranks: tuple[dict[str, Any], Path],
) -> None:
    results, root = two_ranks
    jobs = {"base-into-tp2-ep2": (str(root / BASE), EP2, RESHARD_4)}
    got = run_ranks(_jobs, 4, str(root), jobs, timeout=240)[0]["base-into-tp2-ep2-resumed"]
    _assert_resharded_resume(got, results[BASE], "tp=2 x ep=2")
