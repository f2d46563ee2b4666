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
import torch.distributed as dist

from framework.comm import collectives as C
from framework.models.moe.balancing import deterministic_sums, expert_counts
from framework.models.recompute import in_backward


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
    slot_N: torch.Tensor | None = None
    """(token, expert) slot ``t * k + j`` of every dispatched row (int64); the fixed-order combine needs it."""


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
            counts_E = expert_counts(topk_ids_TK, E)
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
        if deterministic_sums():
            # Gather from a copy per slot: every index is unique, so the backward adds each token's k gradients
            # by a reduction over k instead of an index_add with repeated indices.
            x_ND = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[-1]).reshape(T * K, -1).index_select(0, order_S)
        else:
            x_ND = x_TD.index_select(0, token_idx_N)
        weights_N = topk_weights_TK.reshape(-1).index_select(0, order_S)
        ctx = DispatchContext(token_idx_N, weights_N, T, dropped, ids_S.numel(), x_TD.dtype, order_S)
        return x_ND, tokens_per_expert_E, ctx

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        weighted_ND = y_ND.float() * ctx.weights_N.float().unsqueeze(-1)
        if deterministic_sums() and ctx.slot_N is not None:
            return _sum_slots_per_token(weighted_ND, ctx.slot_N, ctx.num_tokens, ctx.routed_N).to(
                ctx.out_dtype
            )
        out_TD = weighted_ND.new_zeros(ctx.num_tokens, y_ND.shape[-1])
        out_TD.index_add_(0, ctx.token_idx_N, weighted_ND)
        return out_TD.to(ctx.out_dtype)


def _sum_slots_per_token(
    rows_ND: torch.Tensor, slot_N: torch.Tensor, num_tokens: int, num_slots: int
) -> torch.Tensor:
    """Each token's rows summed in slot order (``index_add_``'s result without its atomics): rows are copied to
    their unique slots ``t * k + j`` (dropped slots stay 0) and the ``k`` slots of each token summed."""
    slots_SD = rows_ND.new_zeros(num_slots, rows_ND.shape[-1]).index_copy(0, slot_N, rows_ND)
    if num_tokens == 0:
        return slots_SD  # [0, D], still in the graph of the rows
    return slots_SD.view(num_tokens, num_slots // num_tokens, -1).sum(dim=1)


@dataclass
class AllToAllContext:
    """What :meth:`AllToAllDispatcher.combine` needs: the local context plus the exchange's shape."""

    local: DispatchContext
    input_splits: list[int]
    """Rows this rank sent to each expert-parallel rank."""
    output_splits: list[int]
    """Rows this rank received from each expert-parallel rank."""
    to_expert_major_M: torch.Tensor
    """Permutation from received order (source rank, then local expert) to local-expert-major order."""

    @property
    def dropped_N(self) -> torch.Tensor:
        return self.local.dropped_N

    @property
    def routed_N(self) -> int:
        return self.local.routed_N


class AllToAllDispatcher:
    """Expert-parallel dispatch over ``group`` (``ep`` ranks, each computing ``E / ep`` consecutive experts).

    1. Locally: route, apply the capacity limit (drops happen here, before anything is sent), and group rows by
       global expert — which also groups them by destination rank.
    2. Exchange per-expert row counts (one small ``all_to_all_single``), then the rows themselves with uneven splits
       (autograd-aware): dropless mode moves exactly the routed rows, no padding.
    3. Regroup received rows by local expert for the grouped GEMM; ``combine`` reverses 3 and 2, then weights and
       sums each token's rows like :class:`LocalDispatcher`.

    ``rows_sent`` / ``rows_sent_remote`` count (token, expert) rows sent by this rank (remote: to other ranks) since
    the last :meth:`reset_traffic`; multiply by ``hidden × element size`` for bytes (each way).
    """

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup,
        capacity_factor: float = 0.0,
        drop_policy: Literal["probs", "position"] = "probs",
    ) -> None:
        self.ep_size = C.group_size(group)
        self.ep_rank = C.group_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.group = group
        self.local = LocalDispatcher(num_experts, capacity_factor, drop_policy)
        self.reset_traffic()

    def reset_traffic(self) -> None:
        self.rows_sent = 0
        self.rows_sent_remote = 0

    def dispatch(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllContext]:
        x_ND, tokens_per_expert_E, local_ctx = self.local.dispatch(x_TD, topk_ids_TK, topk_weights_TK)
        R, L = self.ep_size, self.num_local_experts
        with torch.no_grad():
            send_counts_E = tokens_per_expert_E.to(torch.int64)
            recv_counts_E = C.all_to_all_equal(send_counts_E, self.group)
            send_RL = send_counts_E.view(R, L)
            recv_RL = recv_counts_E.view(R, L)
            input_splits = send_RL.sum(1).tolist()
            output_splits = recv_RL.sum(1).tolist()
            local_expert_of_row_M = torch.repeat_interleave(
                torch.arange(L, device=x_ND.device).repeat(R), recv_RL.reshape(-1).to(x_ND.device)
            )
            to_expert_major_M = torch.sort(local_expert_of_row_M, stable=True).indices
            tokens_per_local_expert_L = recv_RL.sum(0)
        if torch.is_grad_enabled() and not in_backward():  # training forwards, once each (not a recompute)
            self.rows_sent += sum(input_splits)
            self.rows_sent_remote += sum(input_splits) - input_splits[self.ep_rank]
        x_MD = C.all_to_all_autograd(x_ND, output_splits, input_splits, self.group)
        x_MD = x_MD.index_select(0, to_expert_major_M)
        ctx = AllToAllContext(local_ctx, input_splits, output_splits, to_expert_major_M)
        return x_MD, tokens_per_local_expert_L, ctx

    def combine(self, y_MD: torch.Tensor, ctx: AllToAllContext) -> torch.Tensor:
        y_received_MD = torch.empty_like(y_MD).index_copy(0, ctx.to_expert_major_M, y_MD)
        y_ND = C.all_to_all_autograd(y_received_MD, ctx.input_splits, ctx.output_splits, self.group)
        return self.local.combine(y_ND, ctx.local)
