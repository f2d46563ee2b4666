"""Every hook gets the raw model, never the data-parallel wrapper: under DDP (2 gloo ranks, the shared ``dp2-ddp``
layout run of ``layouts.py``) each hook that passes ``model`` saw one and the same object, the user's module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.distributed.layouts import register

register(2, {"dp2-ddp": ("parallel.data=ddp",)})

HOOKS_OF_A_RUN = {
    "expertrain_transform_model",
    "expertrain_init_weights",
    "expertrain_trainable_parameters",
    "expertrain_after_parallelize",
    "expertrain_optimizer_param_groups",
    "expertrain_after_optimizer",
    "expertrain_step_begin",
    "expertrain_extra_losses",
    "expertrain_after_backward",
    "expertrain_after_optimizer_step",
    "expertrain_metrics",
    "expertrain_train_end",
}
"""The hooks passing ``model`` that fire in a training run without checkpoints."""


def test_every_hook_gets_the_raw_model_under_ddp(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    result = trained_layouts(2)[0]["dp2-ddp"]
    assert isinstance(result, dict), f"dp2-ddp failed:\n{result}"
    seen = result["hook_models"]
    assert set(seen) == HOOKS_OF_A_RUN
    wrapped = sorted(hook for hook, entries in seen.items() if any(is_ddp for _, _, is_ddp in entries))
    assert not wrapped, f"hooks given the DistributedDataParallel wrapper: {wrapped}"
    objects = {(model_id, name) for entries in seen.values() for model_id, name, _ in entries}
    assert len(objects) == 1, f"the hooks saw {len(objects)} model objects: {sorted(seen.items())}"
    assert next(iter(objects))[1] == "Transformer"
