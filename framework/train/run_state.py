"""Where a run stands (the step done, the samples and tokens consumed: saved with every checkpoint), what one
step gave, and the error a step that diverged raises."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunState:
    """The position of a run: restored from a checkpoint on resume, advanced by every step."""

    step: int = 0
    samples_consumed: int = 0
    started: float = field(default_factory=time.time)
    tokens_seen: int = 0


@dataclass
class StepResult:
    """One optimizer step: mean LM loss per token, aux losses, gradient norm, loss tokens, seconds."""

    loss: float
    aux: dict[str, float]
    grad_norm: float
    tokens: int
    seconds: float


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def divergence(loss: float, grad_norm: float, step: int, last_checkpoint: Path | None) -> TrainingDiverged:
    """The error a step with a non-finite loss or gradient norm raises: one line naming the last good checkpoint
    (or saying none was saved) and the fix."""
    fix = "lower optim.lr, raise optim.warmup_steps or enable optim.grad_clip"
    after = (
        f"The last good checkpoint ({last_checkpoint.name}) is untouched: {fix}, then rerun to resume from it"
        if last_checkpoint is not None
        else f"No checkpoint was saved before it (checkpoint.every): {fix}, then rerun from the start"
    )
    return TrainingDiverged(
        f"loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping without saving. {after}"
    )
