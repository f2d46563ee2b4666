"""Language-model loss summed over tokens, so the trainer can normalise by the global count of loss tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ``IGNORE_INDEX`` (fp32)."""
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_loss_tokens(labels_BS: torch.Tensor) -> int:
    return int((labels_BS != IGNORE_INDEX).sum())
