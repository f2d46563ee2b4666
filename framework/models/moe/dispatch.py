"""Token dispatch: route ``T`` tokens' ``k`` copies to experts and bring the results back.

A dispatcher is its own component so that an expert-parallel all-to-all dispatcher can replace
:class:`LocalDispatcher` without touching :class:`~framework.models.moe.layer.MoELayer`. The contract:

- ``dispatch(x_TD, topk_ids_TK, topk_weights_TK) -> (x_ND, tokens_per_expert_E, ctx)``: ``x_ND`` holds the kept
  (token, expert) rows grouped by expert (expert 0 first), ``tokens_per_expert_E`` (int64) the group sizes of the
  experts this rank computes, ``ctx`` whatever ``combine`` needs.
- ``combine(y_ND, ctx) -> y_TD``: weight every row by its gate weight, sum each token's rows in fp32, cast to the input
  dtype. Dropped rows contribute 0 (the residual connection carries those tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch


@dataclass
class DispatchContext:
    """What :meth:`LocalDispatcher.combine` needs to undo :meth:`LocalDispatcher.dispatch`."""

    token_idx_N: torch.Tensor
    """Source token of every dispatched row (int64)."""
    weights_N: torch.Tensor
    """Gate weight of every dispatched row (fp32)."""
    num_tokens: int
    """``T``."""
    dropped_N: torch.Tensor
    """Number of (token, expert) pairs dropped by the capacity limit (int64 scalar; 0 when dropless)."""
    routed_N: int
    """Number of (token, expert) pairs before dropping (``T * k``)."""
    out_dtype: torch.dtype
    """dtype of the dispatched input; ``combine`` returns this dtype."""


@runtime_checkable
class TokenDispatcher(Protocol):
    """Moves token copies to experts and back. See the module docstring for the contract."""

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]: ...

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor: ...


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(T * k / E * capacity_factor)``."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


class LocalDispatcher:
    """Single-rank dispatch (expert parallel size 1): a stable sort of the flattened expert ids.

    With ``capacity_factor > 0`` each expert keeps at most ``C`` rows: the ones with the highest gate weight
    (``drop_policy="probs"``) or the earliest tokens (``"position"``); ``capacity_factor == 0`` is dropless.
    """

    def __init__(
        self,
        num_experts: int,
        capacity_factor: float = 0.0,
        drop_policy: Literal["probs", "position"] = "probs",
    ) -> None:
        if drop_policy not in ("probs", "position"):
            raise ValueError(f"drop_policy must be 'probs' or 'position', got {drop_policy!r}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        T, K = topk_ids_TK.shape
        E = self.num_experts
        with torch.no_grad():
            ids_S = topk_ids_TK.reshape(-1)  # S = T*K slots, slot s belongs to token s // K
            counts_E = torch.bincount(ids_S, minlength=E)
            if self.capacity_factor > 0 and self.drop_policy == "probs":
                # Highest weight first inside each expert: sort by -weight, then stably by expert.
                by_weight_S = torch.sort(
                    topk_weights_TK.detach().reshape(-1), descending=True, stable=True
                ).indices
                order_S = by_weight_S[torch.sort(ids_S[by_weight_S], stable=True).indices]
            else:
                order_S = torch.sort(ids_S, stable=True).indices  # earliest token first inside each expert
            if self.capacity_factor > 0:
                capacity = expert_capacity(T, K, E, self.capacity_factor)
                starts_E = torch.cumsum(counts_E, 0) - counts_E
                rank_S = torch.arange(ids_S.numel(), device=ids_S.device) - starts_E[ids_S[order_S]]
                order_S = order_S[rank_S < capacity]
                tokens_per_expert_E = counts_E.clamp(max=capacity)
            else:
                tokens_per_expert_E = counts_E
            dropped = ids_S.numel() - tokens_per_expert_E.sum()
            token_idx_N = order_S // K
        x_ND = x_TD.index_select(0, token_idx_N)
        weights_N = topk_weights_TK.reshape(-1).index_select(0, order_S)
        ctx = DispatchContext(token_idx_N, weights_N, T, dropped, ids_S.numel(), x_TD.dtype)
        return x_ND, tokens_per_expert_E, ctx

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        weighted_ND = y_ND.float() * ctx.weights_N.float().unsqueeze(-1)
        out_TD = weighted_ND.new_zeros(ctx.num_tokens, y_ND.shape[-1])
        out_TD.index_add_(0, ctx.token_idx_N, weighted_ND)
        return out_TD.to(ctx.out_dtype)
