"""Whether code runs inside autograd's backward pass, for forwards that keep statistics.

Activation checkpointing runs a block's forward a second time during the backward. Code that counts something per
training forward (expert counts, all-to-all traffic, a plugin's balance statistics) asks :func:`in_backward` so each
token is counted once.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation checkpointing recomputing a forward)."""
    return torch._C._current_graph_task_id() != -1
