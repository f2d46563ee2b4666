"""Helpers shared by the plugin-system tests."""

from __future__ import annotations

import torch
from torch import nn

from framework.config import resolve


class TinyModel(nn.Module):
    """Parameters ``a.weight``, ``a.bias``, ``b.weight``; logits of shape [batch, seq, 5]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def job(pm, plugins: list[str] | None = None, **sections):
    """A resolved JobConfig that accepts the sections of the plugins loaded in ``pm``."""
    raw = {"plugins": list(plugins if plugins is not None else pm.plugin_names), **sections}
    return resolve(raw, pm.config_sections)
