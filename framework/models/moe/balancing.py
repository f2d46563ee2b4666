"""Load balancing for token-choice routers: auxiliary losses and the aux-loss-free expert bias.

All functions return *unweighted* terms; :class:`~framework.models.moe.layer.MoELayer` multiplies by the configured
coefficients. Counts are always exact int64 histograms (a bf16/fp16 count cannot represent 257 and flips the sign of
the bias update on large batches).

Normalisation: each term is normalised by the tokens of the micro-batch it was computed on, exactly like the mean
language-model loss of that micro-batch, so a trainer that averages micro-batch losses averages these the same way.

Sequence parallelism (``group``): when the micro-batch's tokens are split along the sequence over the ranks of
``group`` (equal slices), every term is computed from the whole micro-batch's statistics — counts are all-reduced —
and each rank returns its *share*: the terms are linear in the per-token probabilities once the counts are fixed, so
the shares sum over ``group`` to the unsplit value, and each rank's gradient is its own tokens' part of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.comm import collectives as C


def _sum_over(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``t`` summed over ``group`` (no gradient; a copy), or ``t`` itself without a group."""
    if group is None:
        return t
    return C.all_reduce_sum(t.detach().clone(), group)


def deterministic_sums() -> bool:
    """Whether the MoE sums take their fixed-order paths: torch's deterministic algorithms are on
    (``train.deterministic``). Read at call time; ``torch.compile`` guards on it and recompiles when it changes."""
    return torch.are_deterministic_algorithms_enabled()


def one_hot_counts(ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """``counts[..., i] = #{j: ids[..., j] == i}`` by comparing with every expert id and summing the matches: a
    reduction, so it has no atomics whose order could vary (uses ``ids.numel() * num_experts`` booleans)."""
    experts = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    return (ids.unsqueeze(-1) == experts).sum(dim=-2, dtype=dtype)


def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Exact int64 histogram of the routed (token, expert) pairs: ``counts[i] = #{(t, j): topk_ids[t, j] == i}``.

    A scatter-add into ``num_experts`` bins rather than ``bincount``, whose output size depends on the data: this one
    traces under ``torch.compile`` without a graph break. With :func:`deterministic_sums`, a one-hot sum: the same
    integers without a scatter kernel (on CUDA, atomic adds in no fixed order)."""
    ids_S = topk_ids_TK.reshape(-1).to(torch.int64)
    if deterministic_sums():
        return one_hot_counts(ids_S.unsqueeze(0), num_experts, torch.int64)[0]
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_S.device)
    return counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))


def load_balance_loss(
    probs_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Switch/GShard balance loss ``E/(k·T) · Σ_i c_i · P_i``.

    ``c_i`` = (token, expert) pairs routed to ``i`` (no gradient), ``P_i`` = mean router probability of ``i`` over the
    ``T`` tokens. Equals 1 for perfectly uniform routing. With ``group``: this rank's share (module docstring).
    """
    T, K = topk_ids_TK.shape
    T_total = T * (C.group_size(group) if group is not None else 1)
    counts_E = _sum_over(expert_counts(topk_ids_TK, num_experts), group).to(probs_TE.dtype)
    mean_probs_E = probs_TE.sum(dim=0) / T_total
    return num_experts / (K * T_total) * (counts_E * mean_probs_E).sum()


def sequence_load_balance_loss(
    probs_BSE: torch.Tensor,
    topk_ids_BSK: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: :func:`load_balance_loss` per sequence, averaged over the batch.

    With ``group`` every rank holds a slice of each sequence; counts per sequence are summed over it."""
    B, S, K = topk_ids_BSK.shape
    S_total = S * (C.group_size(group) if group is not None else 1)
    if deterministic_sums():
        counts_BE = one_hot_counts(topk_ids_BSK.reshape(B, S * K), num_experts, probs_BSE.dtype)
    else:
        one_hot_BSE = torch.zeros(B, S, num_experts, dtype=probs_BSE.dtype, device=probs_BSE.device)
        one_hot_BSE.scatter_add_(2, topk_ids_BSK, torch.ones_like(topk_ids_BSK, dtype=probs_BSE.dtype))
        counts_BE = one_hot_BSE.sum(dim=1)
    counts_BE = _sum_over(counts_BE, group)
    mean_probs_BE = probs_BSE.sum(dim=1) / S_total
    return (num_experts / (K * S_total) * (counts_BE * mean_probs_BE).sum(dim=-1)).mean()


def router_z_loss(logits_TE: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)²`` (in fp32); with ``group``, this rank's share."""
    T_total = logits_TE.shape[0] * (C.group_size(group) if group is not None else 1)
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).sum() / T_total


@torch.no_grad()
def update_bias_(expert_bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step, in place: ``b_i += rate · sign(mean(c) − c_i)``.

    Under-loaded experts (below the mean count) get a higher bias, overloaded ones a lower bias. ``counts_E`` must be
    an exact integer tensor (int64/int32), summed over every rank that routed tokens.
    """
    if counts_E.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert counts must be exact integers (int64), got {counts_E.dtype}")
    if expert_bias_E.dtype != torch.float32:
        raise TypeError(f"expert_bias must be fp32, got {expert_bias_E.dtype}")
    counts_f64 = counts_E.to(device=expert_bias_E.device, dtype=torch.float64)
    step_E = torch.sign(counts_f64.mean() - counts_f64).to(torch.float32)
    return expert_bias_E.add_(step_E, alpha=rate)
