"""Where a run stands (the step done, the samples and tokens consumed: saved with every checkpoint) and what one
step gave."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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
