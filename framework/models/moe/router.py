"""Top-k token-choice router, computed in fp32. Registered as router component ``"topk"``.

Steps for ``T`` tokens and ``E`` experts:

1. ``logits_TE = x_TD W_gᵀ`` in fp32 (autocast is switched off for the router).
2. ``scores_TE = softmax(logits)`` or ``sigmoid(logits)``.
3. Selection scores = scores + ``expert_bias`` (aux-loss-free balancing; the bias only changes *which* experts are
   picked, never the gate weights).
4. Group-limited routing (``n_groups > 1``): a group's score is the sum of its top-2 selection scores; the best
   ``topk_groups`` groups are kept and the others are masked with ``-inf`` (masking with 0 would let a masked expert
   beat a kept expert whose biased score is negative).
5. Top-k over the selection scores; gate weights are the *unbiased* scores of the chosen experts, renormalised to sum
   to 1 (always for sigmoid, optional for softmax) and multiplied by ``route_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.init import normal_
from framework.models.sharding import local_weight


@dataclass
class RouterOutput:
    """What a router returns for ``T`` tokens: everything in fp32 except the int64 expert ids."""

    logits_TE: torch.Tensor
    """Raw router logits (fp32)."""
    scores_TE: torch.Tensor
    """Unbiased softmax/sigmoid scores (fp32); the load-balance losses use these."""
    topk_ids_TK: torch.Tensor
    """Chosen experts per token (int64)."""
    topk_weights_TK: torch.Tensor
    """Gate weights of the chosen experts (fp32), renormalised and scaled."""


class TopKRouter(nn.Module):
    """Linear gate + softmax/sigmoid + optional bias and group limiting + top-k.

    ``expert_bias`` (fp32 ``[E]``, persistent so checkpoints carry it) exists only when ``use_expert_bias``; it stays
    fp32 even if the module is cast to bf16.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: Literal["softmax", "sigmoid"] = "softmax",
        route_norm: bool = True,
        route_scale: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        use_expert_bias: bool = False,
    ) -> None:
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if num_experts % n_groups:
            raise ValueError(f"n_groups={n_groups} must divide num_experts={num_experts}")
        if n_groups > 1 and top_k > topk_groups * (num_experts // n_groups):
            raise ValueError(f"top_k={top_k} exceeds the experts in topk_groups={topk_groups} groups")
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = score_func
        self.route_norm = route_norm
        self.route_scale = route_scale
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.expert_bias: torch.Tensor | None
        if use_expert_bias:
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True
            )
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), local_weight(self.gate.weight).float())
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        with torch.no_grad():
            choice_TE = scores_TE.detach()
            if self.expert_bias is not None:
                choice_TE = choice_TE + self.expert_bias.float()
            if self.n_groups > 1:
                choice_TE = self._mask_groups(choice_TE)
            topk_ids_TK = choice_TE.topk(self.top_k, dim=-1).indices

        topk_weights_TK = scores_TE.gather(-1, topk_ids_TK)
        if self.score_func == "sigmoid" or self.route_norm:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            topk_weights_TK = topk_weights_TK * self.route_scale
        return RouterOutput(logits_TE, scores_TE, topk_ids_TK, topk_weights_TK)

    def _mask_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Keep the ``topk_groups`` best groups (score = sum of each group's top-2); the rest become ``-inf``."""
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, self.n_groups, E // self.n_groups)
        per_group = min(2, E // self.n_groups)
        group_scores_TG = choice_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
        keep_TK = group_scores_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_TK, True)
        return choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Gate ``N(0, init_std)``; the expert bias starts at 0."""
        normal_(self.gate.weight, init_std, generator)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the bias fp32 through module.to(bf16) / half(): a bf16 bias cannot represent gamma-sized steps.
        super()._apply(fn, recurse)
        if (
            self.expert_bias is not None
            and self.expert_bias.is_floating_point()
            and self.expert_bias.dtype != torch.float32
        ):
            self.expert_bias = self.expert_bias.float()
        return self

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, score={self.score_func}, norm={self.route_norm}, "
            f"scale={self.route_scale}, groups={self.n_groups}/{self.topk_groups}, bias={self.expert_bias is not None}"
        )
