"""Training engines: what reduces gradients, clips them, steps the optimizer and moves training state in and out
of checkpoints. The trainer builds the model, the torch AdamW and the schedule the same way for every engine and
drives one step through this seam::

    for i, (inputs, labels) in enumerate(micro_batches):
        with engine.micro_batch(last=i == len(micro_batches) - 1):
            objective = ...                 # forward through engine.model
            engine.backward(objective)
    engine.finish_gradients()               # gradients complete (plugins' after_backward sees them)
    grad_norm = engine.step()               # clip to optim.grad_clip, optimizer step, zero the gradients
    scheduler.step()                        # the job's own schedule, on the same torch AdamW param groups

- :class:`NativeEngine` (``train.engine: native``): the model wrapped by DDP or FSDP2 (``framework.parallel``).
- :class:`~framework.engines.deepspeed_engine.DeepSpeedEngine` (``train.engine: deepspeed``): DeepSpeed ZeRO 0-3
  around the unwrapped model and the same optimizer; see ``docs/deepspeed.md``.

Both read and write checkpoints as the same tree (``state_dicts``: parameter-name keyed model and optimizer state,
the format of ``torch.distributed.checkpoint.state_dict.get_state_dict``), so a run resumes under either engine.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from framework.parallel.data_parallel import gradient_sync, rescale_expert_gradients
from framework.parallel.grad_clip import clip_grad_norm_
from framework.parallel.grads import reduce_pending_gradients
from framework.parallel.mesh import ParallelLayout

StateDicts = tuple[dict[str, Any], dict[str, Any]]
"""``(model_state, optimizer_state)`` keyed by parameter name."""


class Engine(Protocol):
    name: str
    model: nn.Module
    """What forward (training, evaluation and sampling) runs through."""

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def finish_gradients(self) -> None:
        """After the step's last backward: leave every gradient complete (averaged over data-parallel ranks)."""
        ...

    def step(self) -> float: ...

    def state_dicts(self) -> StateDicts: ...

    def state_targets(self) -> StateDicts: ...

    def load_state_dicts(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None: ...


class NativeEngine:
    """DDP or FSDP2 (``model`` arrives wrapped) with torch AdamW. The engine finishes what the wrapper leaves undone
    (tensor-parallel partial sums without FSDP, the expert average FSDP leaves at ``1/efsdp``) and clips by the true
    global norm over every rank's gradients (any mix of meshes) to ``max_norm`` (``inf``: measure only).

    ``raw_model`` (the module inside any wrapper) and ``layout`` are needed only for tensor or expert parallelism."""

    name = "native"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_norm: float = float("inf"),
        *,
        raw_model: nn.Module | None = None,
        layout: ParallelLayout | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.max_norm = max_norm
        self._raw = raw_model if raw_model is not None else model
        self._layout = layout

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients only on the last micro-batch of a step (DDP ``no_sync``, FSDP2 gradient sync)."""
        return gradient_sync(self.model, last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_gradients(self) -> None:
        if self._layout is None:
            return
        if self._layout.tp > 1:
            reduce_pending_gradients(self.model.parameters())
        rescale_expert_gradients(self._raw, self._layout)

    def clip_gradients(self) -> float:
        """Clip to ``max_norm`` by the global norm over every rank's gradients; returns that norm."""
        return float(
            clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.max_norm)
        )

    def step(self) -> float:
        norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dicts(self) -> StateDicts:
        return get_state_dict(self.model, self.optimizer)

    def state_targets(self) -> StateDicts:
        return get_state_dict(self.model, self.optimizer)

    def load_state_dicts(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


__all__ = ["Engine", "NativeEngine", "StateDicts"]
