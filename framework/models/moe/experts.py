"""Routed experts as fused 3-D weights, with the compute kernel behind one seam.

Weights use the transformers-5 in-memory layout, so importing a Hugging Face MoE checkpoint is a copy:

- ``gate_up_proj [E, 2, I, H]``: ``[:, 0]`` is the gate projection, ``[:, 1]`` the up projection — in memory exactly
  transformers' ``[E, 2I, H]`` (gate rows first), which the kernels see through a free ``flatten(1, 2)`` view. The
  separate axis lets tensor parallelism split the hidden dimension ``I`` of gate and up together as one ordinary
  shard (``Shard(2)``), which distributed checkpoints can store and reshard;
- ``down_proj [E, H, I]``.

Input rows arrive grouped by expert (expert 0's rows first, …) with ``tokens_per_expert_E`` (int64) giving the group
sizes. Kernels (``EXPERT_IMPLS``), all numerically equivalent:

- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with int32 cumulative offsets (one call per projection);
- ``loop``: one matmul per expert over its contiguous slice (experts with no rows are skipped);
- ``bmm``: rows scattered into a zero-padded ``[E, max_rows, H]`` batch, one ``bmm`` per projection;
- ``auto``: ``grouped_mm`` on CUDA, ``loop`` elsewhere (the fastest measured path on CPU; see docs/moe.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from framework.models.init import normal_
from framework.models.mlp import swiglu
from framework.models.sharding import local_weight

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(x_ND, gate_up_proj_E2IH, down_proj_EHI, tokens_per_expert_E) -> y_ND``."""


def _swiglu(h_N2I: torch.Tensor) -> torch.Tensor:
    gate_NI, up_NI = h_N2I.chunk(2, dim=-1)
    return swiglu(gate_NI, up_NI)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm rejects expanded gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def experts_grouped_mm(
    x_ND: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
) -> torch.Tensor:
    """Grouped GEMM. ``grouped_mm`` needs int32 offsets, matching dtypes (autocast does not cover it, so the input
    is cast to the weight dtype) and, on CPU with torch <= 2.10, 16-byte aligned storage (we pass fresh tensors)."""
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    dtype = (
        torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else None
    )
    w_gu, w_d = w_gate_up_E2IH, w_down_EHI
    if dtype is not None:
        w_gu, w_d = w_gu.to(dtype), w_d.to(dtype)
    x_ND = x_ND.to(w_gu.dtype)
    if x_ND.device.type == "cpu":
        # torch 2.13 has no fake-tensor rule for _grouped_mm on CPU: torch.compile runs this part eagerly there.
        return _grouped_swiglu_eager(x_ND, w_gu, w_d, offsets_E)
    return _grouped_swiglu(x_ND, w_gu, w_d, offsets_E)


def _grouped_swiglu(
    x_ND: torch.Tensor, w_gu_E2IH: torch.Tensor, w_d_EHI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    h_N2I = F.grouped_mm(x_ND, w_gu_E2IH.transpose(-2, -1), offs=offsets_E)
    y_ND = F.grouped_mm(_swiglu(h_N2I), w_d_EHI.transpose(-2, -1), offs=offsets_E)
    return _ContiguousGrad.apply(y_ND)


def _grouped_swiglu_eager(
    x_ND: torch.Tensor, w_gu_E2IH: torch.Tensor, w_d_EHI: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        return _grouped_swiglu(x_ND, w_gu_E2IH, w_d_EHI, offsets_E)
    # Only under torch.compile: wrapping at import time would import torch._dynamo in every process (~1-2 s).
    global _grouped_swiglu_not_compiled
    if _grouped_swiglu_not_compiled is None:
        _grouped_swiglu_not_compiled = torch.compiler.disable(_grouped_swiglu)
    return _grouped_swiglu_not_compiled(x_ND, w_gu_E2IH, w_d_EHI, offsets_E)


_grouped_swiglu_not_compiled = None


def experts_loop(
    x_ND: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
) -> torch.Tensor:
    """One matmul per expert on its contiguous slice (a host sync for the split sizes).

    The weights are split with ``unbind`` rather than indexed per expert: the backward of ``w[e]`` allocates and
    zero-fills a full ``[E, ...]`` gradient for every expert (13% of the layer's time at E=8), while ``unbind``'s
    backward stacks the per-expert gradients once.
    """
    w_gate_up = w_gate_up_E2IH.unbind(0)
    w_down = w_down_EHI.unbind(0)
    outputs = []
    for e, x_nD in enumerate(torch.split(x_ND, tokens_per_expert_E.tolist())):
        if x_nD.shape[0] == 0:
            continue
        outputs.append(_swiglu(x_nD @ w_gate_up[e].T) @ w_down[e].T)
    if not outputs:
        # No rows here (e.g. an expert-parallel rank nobody routed to): still build a graph through the weights,
        # so this rank's backward reaches the all-to-all collectives the other ranks wait in.
        return _swiglu(x_ND @ w_gate_up[0].T) @ w_down[0].T
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def experts_bmm(
    x_ND: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
) -> torch.Tensor:
    """Zero-pad every expert's rows to the largest group and run one batched matmul per projection."""
    E = tokens_per_expert_E.shape[0]
    N, D = x_ND.shape
    max_rows = int(tokens_per_expert_E.max()) if N else 0
    starts_E = torch.cumsum(tokens_per_expert_E, dim=0) - tokens_per_expert_E
    expert_of_row_N = torch.repeat_interleave(
        torch.arange(E, device=x_ND.device), tokens_per_expert_E, output_size=N
    )
    slot_N = expert_of_row_N * max_rows + (torch.arange(N, device=x_ND.device) - starts_E[expert_of_row_N])
    x_EMD = x_ND.new_zeros(E * max_rows, D).index_copy(0, slot_N, x_ND).view(E, max_rows, D)
    h_EM2I = torch.bmm(x_EMD, w_gate_up_E2IH.transpose(1, 2))
    y_EMD = torch.bmm(_swiglu(h_EM2I), w_down_EHI.transpose(1, 2))
    return y_EMD.reshape(E * max_rows, D)[slot_N]


EXPERT_IMPLS: dict[str, ExpertsFn] = {
    "grouped_mm": experts_grouped_mm,
    "loop": experts_loop,
    "bmm": experts_bmm,
}


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete kernel for ``device``: grouped_mm on CUDA, loop elsewhere."""
    if impl == "auto":
        return "grouped_mm" if device.type == "cuda" else "loop"
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown experts_impl {impl!r}; expected auto or one of {', '.join(EXPERT_IMPLS)}")
    return impl


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts: ``y = down_e(silu(gate_e(x)) * up_e(x))`` for the rows routed to expert ``e``.

    Under expert / tensor parallelism (:mod:`framework.parallel.expert_parallel`) the weights hold this rank's part
    only: DTensors sharded on dim 0 over the expert-parallel mesh and, with expert tensor parallelism, on the hidden
    dimension over the tensor-parallel mesh (or plain local slices, for engines that want those).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, impl: str = "auto") -> None:
        super().__init__()
        resolve_impl(impl, torch.device("cpu"))  # validate the name early
        self.num_experts = num_experts
        self.dim = dim
        self.hidden = hidden
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def init_from_base(self, base: GroupedExperts) -> None:
        """Extension point for adapter plugins: initialise a subclass that wraps ``base`` (an adapter's experts):
        ``nn.Module.__init__`` and ``base``'s settings and weight Parameters themselves (their names in the model stay
        the same). Call it instead of ``GroupedExperts.__init__``."""
        nn.Module.__init__(self)
        self.num_experts, self.dim, self.hidden, self.impl = (
            base.num_experts,
            base.dim,
            base.hidden,
            base.impl,
        )
        self.gate_up_proj = base.gate_up_proj
        self.down_proj = base.down_proj

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """``x_ND`` grouped by expert, ``tokens_per_expert_E`` int64 summing to ``N`` -> ``y_ND``."""
        fn = EXPERT_IMPLS[resolve_impl(self.impl, x_ND.device)]
        w_gate_up_E2IH = local_weight(self.gate_up_proj).flatten(1, 2)
        return fn(x_ND, w_gate_up_E2IH, local_weight(self.down_proj), tokens_per_expert_E)

    @property
    def num_local_experts(self) -> int:
        """Experts held by this rank (``num_experts / ep`` under expert parallelism)."""
        return local_weight(self.gate_up_proj).shape[0]

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Gate/up ``N(0, init_std)``; down ``N(0, out_std)``."""
        normal_(self.gate_up_proj, init_std, generator)
        normal_(self.down_proj, out_std, generator)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, impl={self.impl}"
