"""Training jobs shared by the distributed tests: the real trainer on spawned gloo ranks, every layout of a world
size in one spawn.

Test modules :func:`register` their layouts at import (pytest imports every module before running any test); the
session fixture ``trained_layouts`` (``conftest.py``) trains all layouts of a world size the first time a test asks
for one, in the spawn the other modules' shared workers of that size run in (``shared_spawn.py``), so imports, data
preparation and process start-up are paid once per world size, not once per test. Each
layout runs in ``<root>/<name>`` and returns its per-step losses, gradient norms and step-1 gradients (rank 0), and
the model object each hook got (:class:`HookModels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from framework.hooks.markers import hookimpl
from framework.observe.metrics import read_metrics
from tests.integration.launch import QUICKSTART, TINY

# Every feature event of the plugin layouts (a LIFT refresh, an HFT stage change) falls before the last step.
STEPS = 3
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

REGISTRY: dict[int, dict[str, tuple[str, ...]]] = {}
"""``{world size: {layout name: overrides}}`` of every registered layout."""


def register(world: int, layouts: dict[str, tuple[str, ...]]) -> None:
    """Add layouts trained on ``world`` ranks; a name registered twice with other overrides is an error."""
    group = REGISTRY.setdefault(world, {})
    for name, overrides in layouts.items():
        if group.get(name, overrides) != overrides:
            raise ValueError(f"layout {name!r} (world {world}) is registered twice with different overrides")
        group[name] = tuple(overrides)


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


class HookModels:
    """Records which object every hook that passes ``model`` got: its id, its class and whether it is a DDP wrapper.

    Implements ``expertrain_init_weights`` with ``expertrain_transform_model`` (both do nothing), so the model is
    still built on the meta device; answers ``None`` wherever a hook returns something."""

    def __init__(self) -> None:
        self.seen: dict[str, set[tuple[int, str, bool]]] = {}

    def _record(self, hook: str, model: torch.nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = isinstance(model, DistributedDataParallel)
        self.seen.setdefault(hook, set()).add((id(model), type(model).__name__, wrapped))

    def models(self) -> dict[str, list[tuple[int, str, bool]]]:
        return {hook: sorted(entries) for hook, entries in self.seen.items()}

    @hookimpl
    def expertrain_transform_model(self, model: torch.nn.Module) -> None:
        self._record("expertrain_transform_model", model)

    @hookimpl
    def expertrain_init_weights(self, model: torch.nn.Module) -> None:
        self._record("expertrain_init_weights", model)

    @hookimpl
    def expertrain_trainable_parameters(self, model: torch.nn.Module) -> None:
        self._record("expertrain_trainable_parameters", model)

    @hookimpl
    def expertrain_after_parallelize(self, model: torch.nn.Module) -> None:
        self._record("expertrain_after_parallelize", model)

    @hookimpl
    def expertrain_optimizer_param_groups(self, model: torch.nn.Module) -> None:
        self._record("expertrain_optimizer_param_groups", model)

    @hookimpl
    def expertrain_after_optimizer(self, model: torch.nn.Module) -> None:
        self._record("expertrain_after_optimizer", model)

    @hookimpl
    def expertrain_step_begin(self, model: torch.nn.Module) -> None:
        self._record("expertrain_step_begin", model)

    @hookimpl
    def expertrain_extra_losses(self, model: torch.nn.Module) -> None:
        self._record("expertrain_extra_losses", model)

    @hookimpl
    def expertrain_after_backward(self, model: torch.nn.Module) -> None:
        self._record("expertrain_after_backward", model)

    @hookimpl
    def expertrain_after_optimizer_step(self, model: torch.nn.Module) -> None:
        self._record("expertrain_after_optimizer_step", model)

    @hookimpl
    def expertrain_metrics(self, model: torch.nn.Module) -> None:
        self._record("expertrain_metrics", model)

    @hookimpl
    def expertrain_train_end(self, model: torch.nn.Module) -> None:
        self._record("expertrain_train_end", model)


def train_once(
    rank: int, world: int, run_dir: str, overrides: tuple[str, ...], device: str = "cpu"
) -> dict[str, Any]:
    """One job on this rank (``device="cuda"``: on ``cuda:rank``, tests/gpu)."""
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(str(QUICKSTART), [*TINY, *COMMON, f"run.dir={run_dir}", *overrides])
    capture = GradCapture()
    pm.register_object("grad-capture", capture)
    hook_models = HookModels()
    pm.register_object("hook-models", hook_models)
    torch.manual_seed(config.train.seed + rank)
    on = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    trainer = Trainer(config, pm, DistInfo(rank, world, rank, on))
    trainer.build()
    trainer.run()
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    return {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "grads": capture.grads if rank == 0 else {},
        "hook_models": hook_models.models(),
    }


def train_layouts(
    rank: int, world: int, root: str, layouts: dict[str, tuple[str, ...]], device: str = "cpu"
) -> dict[str, dict[str, Any] | str]:
    """Train every layout in turn on the same ranks (one spawn: imports and data preparation are paid once).
    A layout that fails reports its traceback instead of stopping the others."""
    import traceback

    import torch.distributed as dist

    out: dict[str, dict[str, Any] | str] = {}
    for name, overrides in layouts.items():
        try:
            out[name] = train_once(rank, world, str(Path(root) / name), overrides, device)
        except Exception:  # noqa: BLE001 - reported per layout
            out[name] = traceback.format_exc()
            dist.barrier()  # the layouts after this one start together; a failed collective has timed out by now
    return out


def assert_matches_one_rank(name: str, got: Any, ref: dict[str, Any], steps: int = STEPS) -> None:
    """A parallel layout's run against the one-rank reference: the losses of every step within 1e-3 relative (the
    same samples summed in another order over a few steps) and every step-1 gradient within 1e-5 relative."""
    assert isinstance(got, dict), f"{name} failed:\n{got}"
    assert len(got["losses"]) == steps
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-3, atol=0)
    assert set(got["grads"]) == set(ref["grads"])
    for param, g in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][param], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name, p=param: f"{n} {p}: {m}"
        )


def assert_tensors_close(
    name: str, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 2e-6
) -> None:
    """The same tensor names, each within ``atol`` absolute (final weights after a few steps: fp32 rounding)."""
    assert set(got) == set(ref), f"{name}: {sorted(set(got) ^ set(ref))[:5]}"
    for key, value in ref.items():
        torch.testing.assert_close(
            got[key], value, rtol=0, atol=atol, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
        )
