"""One micro-batch's forward and its summed language-model loss, the same for training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from framework.data.labels import IGNORE_INDEX
from framework.train.loss import lm_loss_sum


class LossForward:
    """Moves a micro-batch to the device, runs the model under the job's autocast and sums its LM loss."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, dtype: str, head_at_labels: bool
    ) -> None:
        """``model``: what runs the forward (the data-parallel wrapper, if any). ``dtype``: ``train.dtype``.
        ``head_at_labels``: run the LM head only at the positions that carry a label when some carry none (false
        under tensor parallelism, or when a plugin's extra loss takes the logits: see
        :meth:`framework.hooks.PluginManager.hook_argument_takers`)."""
        self.model = model
        self.device = device
        self.dtype = dtype
        self.head_at_labels = head_at_labels

    def to_device(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(input_ids, labels[, position_ids])`` on the training device; packed SFT batches carry positions that
        restart per sample (the model masks attention across samples from them)."""
        input_ids, labels = batch[0].to(self.device), batch[1].to(self.device)
        position_ids = batch[2].to(self.device) if len(batch) > 2 else None
        return input_ids, labels, position_ids

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for ``train.dtype=bf16``, else nothing."""
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward one micro-batch (call inside :meth:`autocast`); returns its logits ``[B, S, V]`` (``None`` when the
        LM head ran only at the labelled positions) and the summed LM loss.

        The head runs only where a label is (SFT: the answers) unless every position has one or
        ``head_at_labels`` is false."""
        keep = labels != IGNORE_INDEX
        if self.head_at_labels and not bool(keep.all()):
            logits_NV = self.model(input_ids, position_ids, logits_at=keep)
            return None, lm_loss_sum(logits_NV.unsqueeze(0), labels[keep].unsqueeze(0))
        logits = self.model(input_ids, position_ids)
        return logits, lm_loss_sum(logits, labels)
