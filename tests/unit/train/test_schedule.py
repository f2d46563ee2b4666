"""The learning-rate schedule: warmup + cosine over the run (``optim.decay_steps=0``) or over a fixed decay length
that ``train.steps`` does not change, and the line a resume with another ``train.steps`` logs."""

from __future__ import annotations

import math

from framework.config import OptimConfig
from framework.train.optim import lr_factor, optim_changes, steps_change


def _reference(step: int, warmup: int, decay: int, min_ratio: float) -> float:
    """Warmup then cosine from 1 to ``min_ratio`` over ``decay`` steps, then flat (written out independently)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, decay) / decay
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


def test_fixed_decay_length_makes_the_schedule_independent_of_train_steps() -> None:
    cfg = OptimConfig(warmup_steps=3, decay_steps=10, min_lr_ratio=0.1)
    for step in range(40):
        expected = _reference(step, 3, 10, 0.1)
        for total in (5, 20, 40):  # shorter, longer than warmup + decay: the same factor at every step
            assert abs(lr_factor(step, total, cfg) - expected) <= 1e-15, (step, total)
    assert lr_factor(13, 20, cfg) == lr_factor(30, 20, cfg) == 0.1  # flat at min_lr_ratio after the decay


def test_decay_to_the_end_of_the_run_by_default() -> None:
    cfg = OptimConfig(warmup_steps=2, min_lr_ratio=0.0)
    for total in (10, 30):
        for step in range(total):
            assert abs(lr_factor(step, total, cfg) - _reference(step, 2, total - 2, 0.0)) <= 1e-15
    assert lr_factor(5, 10, cfg) != lr_factor(5, 30, cfg)  # the total shapes the cosine


def test_resume_with_more_steps_says_what_happens_to_the_schedule() -> None:
    fixed = OptimConfig(lr=1e-3, warmup_steps=2, decay_steps=100)
    line = steps_change(200, 300, fixed, 200)
    assert line.startswith("resuming with train.steps 300 (checkpoint 200): the lr schedule does not depend")
    assert optim_changes({}, fixed, 200, (200, 300)) == [line]
    assert optim_changes({}, fixed, 200, (200, 200)) == []  # same length: nothing to say

    total = OptimConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=0.0)
    line = steps_change(200, 400, total, 200)
    # At the end of the 200-step cosine the lr was 0; re-fitted to 400 steps, step 200 is half way: lr / 2.
    assert "re-fitted to 400 steps and continues from step 200 without re-warming (lr 0 -> 0.0005)" in line
    assert "set optim.decay_steps" in line
