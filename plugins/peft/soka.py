"""SoKA: SVD on Kronecker Adaptation (arXiv 2506.15251). Plugin ``soka``.

A targeted ``nn.Linear`` ``W [out, in]`` with ``out = m1·m2``, ``in = n1·n2`` (factors nearest ``√out``, ``√in``) is
split by its Kronecker-product SVD (Van Loan–Pitsianis): the rearrangement ``R(W) [m1·n1, m2·n2]``, whose row
``(i1, j1)`` is the row-major vec of block ``W[i1·m2:(i1+1)·m2, j1·n2:(j1+1)·n2]``, turns ``Σ_k A_k⊗B_k`` into the
matrix ``Σ_k vec(A_k) vec(B_k)ᵀ`` of rank ``r``; with ``R(W) = Σ σ_k u_k v_kᵀ``, ``A_k = unvec(√σ_k u_k) [m1, n1]``,
``B_k = unvec(√σ_k v_k) [m2, n2]`` and ``‖W − Σ_{k≤r} A_k⊗B_k‖²_F = Σ_{k>r} σ_k²``.

PiSSA-style: the principal ``r`` terms are trained (``soka_A [r, m1, n1]``, ``soka_B [r, m2, n2]``), the residual
``W − Σ A_k⊗B_k`` is frozen in ``weight``, so the layer computes ``W`` at step 0. The rank of each layer comes from
its spectrum: the smaller of the energy rank (smallest ``r`` with ``Σ_{k≤r}σ²/Σσ² ≥ τ``) and the elbow (the point of
maximum curvature of the sorted, normalised spectrum; components before it), capped by ``soka.max_rank``. The
forward never builds ``ΔW``: with ``X = x`` reshaped ``[n1, n2]`` (row-major), ``(A⊗B) x = vec(A X Bᵀ)`` (the
card's ``vec(B X Aᵀ)`` in column-major order).

When: the transform builds the structure only (zero factors stored at ``R = min(max_rank, p)`` rows, so it runs on
the meta device and the model is parallelised before any weight exists); ``expertrain_init_weights`` decomposes
the base once its values are final (keyed init, ``model.init_from`` loaded into this rank's shards): one weight at a
time, gathered whole when sharded, in fp64 on the CPU, so every rank gets the same factors and keeps its shards.

Routed experts (``soka.target_experts``): every expert ``e`` of the fused ``gate_up_proj`` (as its ``[2I, H]``
matrix, gate rows first) and ``down_proj`` (``[H, I]``) gets its own KPSVD, its own rank from its own spectrum and
its own residual (:class:`SoKAExperts`). The factors of a layer are stacked ``[E, R, ·, ·]`` at the layer's row
count ``R``; rows past an expert's rank (buffer ``soka_rank [E]``) are zero and never move. The expert forward builds
each expert's ``ΔW_e = Σ_k A_ek⊗B_ek`` and adds it to the residual weights before the unchanged expert kernel (as
LoRA's expert adapters do): the tokens' matmuls dominate, the delta is one ``[E, out, in]`` tensor per weight.

Parallelism: data parallelism (DDP, FSDP2); tensor parallelism with the factors sharded to match the base layer
(column-parallel, ``W`` rows split: ``soka_A`` ``Shard(1)`` on ``m1``, ``soka_B`` replicated; row-parallel, ``W``
columns split: ``soka_A`` ``Shard(2)`` on ``n1``, ``soka_B`` replicated), which needs ``tp | m1`` (``tp | n1``): the
factorisation is chosen so (:func:`kron_factors`); expert parallelism cuts the expert factors with their experts, and
under expert tensor parallelism each rank adds the slice of ``ΔW_e`` matching its part of the hidden dimension.
Export: ``expertrain export soka`` (``soka_model.safetensors`` + ``soka_config.json``: the trained and the initial
factors, so ``ΔW = Σ A_k⊗B_k − Σ A0_k⊗B0_k`` applies to the original base) and ``expertrain export hf --merge``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.models.moe import EXPERT_IMPLS, GroupedExperts, resolve_impl
from framework.models.sharding import local_weight
from framework.observe import console
from plugins.peft.low_rank import hf_module_path
from plugins.peft.modules_to_save import (
    coverage_detail,
    format_fields,
    hf_tensors,
    modules_to_save_option,
    resolve,
    trainable_names,
)
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    claim,
    format_coverage,
    owned_modules,
    restore_plain_experts,
    restore_plain_linear,
    select_targets,
    whole_tensor,
    write_whole,
)

SECTION = "soka"
EXPORT_FORMAT = "soka"
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass
class SoKAConfig:
    """SoKA (arXiv 2506.15251): trained principal Kronecker terms of each targeted linear, frozen residual."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to adapt: module-name suffixes (q_proj, ffn.down_proj, ...), a regular expression matched "
        "against whole module paths, or 'all-linear' (every nn.Linear except the LM head); an empty list adapts "
        "the routed experts only (with target_experts).",
    )
    target_experts: bool = option(
        False,
        doc="Also adapt the fused routed-expert weights gate_up_proj and down_proj: one KPSVD, rank and set of "
        "Kronecker factors per expert.",
    )
    energy: float = option(
        0.9,
        doc="Energy threshold tau: the energy rank is the smallest r with sum_{k<=r} s_k^2 / sum s_k^2 >= tau.",
        min=0.0,
        min_exclusive=True,
        max=1.0,
    )
    max_rank: int = option(8, doc="Cap on every layer's (and every expert's) Kronecker rank.", min=1)
    use_elbow: bool = option(
        True, doc="Take the smaller of the energy rank and the elbow rank (false: the energy rank alone)."
    )
    modules_to_save: list[str] = modules_to_save_option()


# --- the math -----------------------------------------------------------------------------------------------------


def kron_factors(n: int, multiple: int = 1) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = n``, ``multiple | a``, as balanced as possible (smallest ``max(a, b)``, ties to the
    smaller ``a``). With ``multiple = 1``: ``a`` is the largest divisor of ``n`` that is ``≤ √n``. Tensor
    parallelism asks for ``multiple = tp`` on the factor whose index it splits. Raises ``ValueError`` when no divisor
    of ``n`` is a multiple of ``multiple``."""
    options = [a for a in range(multiple, n + 1, multiple) if n % a == 0]
    if not options:
        raise ValueError(f"{n} has no divisor that is a multiple of {multiple}")
    a = min(options, key=lambda d: (max(d, n // d), d))
    return a, n // a


def near_sqrt_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = n`` and ``a`` the largest divisor of ``n`` that is ``≤ √n``."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def rearrange(w: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """Van Loan–Pitsianis ``R(W) [m1·n1, m2·n2]``: row ``i1·n1 + j1`` is the row-major vec of block ``(i1, j1)``
    ``[m2, n2]`` of ``w [m1·m2, n1·n2]``. ``R(A⊗B) = vec(A) vec(B)ᵀ``; not a plain reshape of ``w``. Leading
    dimensions (``[E, m, n]``: one matrix per expert) are kept."""
    *lead, m, n = w.shape
    m2, n2 = m // m1, n // n1
    return w.reshape(*lead, m1, m2, n1, n2).transpose(-3, -2).reshape(*lead, m1 * n1, m2 * n2)


def kron_sum(A_rMN: torch.Tensor, B_rPQ: torch.Tensor) -> torch.Tensor:
    """``Σ_k A_k⊗B_k`` ``[m1·m2, n1·n2]`` (``torch.kron`` layout) of ``A [r, m1, n1]``, ``B [r, m2, n2]``; with
    leading dimensions (``A [E, r, m1, n1]``) one sum per leading index."""
    *lead, _, m1, n1 = A_rMN.shape
    m2, n2 = B_rPQ.shape[-2:]
    return torch.einsum("...rac,...rbd->...abcd", A_rMN, B_rPQ).reshape(*lead, m1 * m2, n1 * n2)


def kron_apply(A_rMN: torch.Tensor, B_rPQ: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(Σ_k A_k⊗B_k) x`` for ``x [..., n1·n2]`` without building the matrix: ``vec(A_k X B_kᵀ)`` with ``X = x``
    reshaped ``[n1, n2]``. Returns ``[..., m1·m2]``.

    Shards compose: rows ``i1 ∈ [a, b)`` of ``A`` give output rows ``[a·m2, b·m2)``; columns ``j1 ∈ [c, d)`` of
    ``A`` with input entries ``[c·n2, d·n2)`` give that column block's partial sum (what tensor parallelism uses)."""
    _, _, n1 = A_rMN.shape
    X = x.unflatten(-1, (n1, -1))
    T = torch.einsum("...cd,rbd->...rcb", X, B_rPQ)  # X B_kᵀ: [..., r, n1, m2]
    return torch.einsum("rac,...rcb->...ab", A_rMN, T).flatten(-2)


@torch.no_grad()
def kpsvd(w: torch.Tensor, m1: int, n1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kronecker-product SVD of ``w`` in fp64: ``A [p, m1, n1]``, ``B [p, m2, n2]`` (all ``p = min(m1·n1, m2·n2)``
    terms, ``A_k = unvec(√σ_k u_k)``, ``B_k = unvec(√σ_k v_k)``) and ``σ [p]`` (descending). Leading dimensions
    (``w [E, m, n]``) give one decomposition per matrix: ``A [E, p, m1, n1]``, ``B [E, p, m2, n2]``, ``σ [E, p]``.
    Non-finite entries count as 0 (only an uninitialised model, e.g. one rebuilt for export before its checkpoint is
    loaded, has any; the checkpoint then replaces every value, and the shapes do not depend on them)."""
    *lead, m, n = w.shape
    m2, n2 = m // m1, n // n1
    w64 = w.detach().cpu().double().nan_to_num(0.0, 0.0, 0.0)
    U, S, Vh = torch.linalg.svd(rearrange(w64, m1, n1), full_matrices=False)
    root = S.sqrt()
    A = (U * root.unsqueeze(-2)).transpose(-1, -2).reshape(*lead, -1, m1, n1)
    B = (Vh * root.unsqueeze(-1)).reshape(*lead, -1, m2, n2)
    return A, B, S


def energy_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest ``r`` with ``Σ_{k≤r} σ_k² / Σ σ² ≥ τ``."""
    energy = (sigma.double() ** 2).cumsum(0)
    if energy[-1] <= 0:
        return 1
    fraction = energy / energy[-1]
    return int(torch.searchsorted(fraction, torch.tensor(tau, dtype=fraction.dtype) - 1e-12)) + 1


def elbow_rank(sigma: torch.Tensor) -> int:
    """The number of components before the elbow: the interior point of maximum curvature
    ``κ = y''/(1 + y'²)^{3/2}`` of the spectrum normalised to ``x, y ∈ [0, 1]`` (central differences). Spectra of
    fewer than 3 values keep them all."""
    p = sigma.numel()
    if p < 3 or float(sigma[0]) <= 0:
        return p
    y = sigma.double() / sigma[0].double()
    h = 1.0 / (p - 1)
    d1 = (y[2:] - y[:-2]) / (2 * h)
    d2 = (y[2:] - 2 * y[1:-1] + y[:-2]) / h**2
    curvature = d2 / (1 + d1**2) ** 1.5
    return int(torch.argmax(curvature)) + 1  # interior point i (1-based) keeps components 0..i-1


def choose_rank(sigma: torch.Tensor, tau: float, max_rank: int, use_elbow: bool = True) -> int:
    """``min(energy rank, elbow rank, max_rank)`` (elbow left out when ``use_elbow`` is false), at least 1."""
    r = energy_rank(sigma, tau)
    if use_elbow:
        r = min(r, elbow_rank(sigma))
    return max(1, min(r, max_rank, sigma.numel()))


@torch.no_grad()
def principal_terms(
    w: torch.Tensor, m1: int, n1: int, tau: float, max_rank: int, use_elbow: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trained start of ``w [out, in]`` (or ``[E, out, in]``, one matrix per expert): the KPSVD terms stored at
    ``R = min(max_rank, p)`` rows, ``A [..., R, m1, n1]``, ``B [..., R, m2, n2]`` (fp64), with rows at and past each
    matrix's chosen rank set to zero, and the ranks (``[]`` or ``[E]`` int64)."""
    A, B, sigma = kpsvd(w, m1, n1)
    flat = sigma.reshape(-1, sigma.shape[-1])
    ranks = torch.tensor([choose_rank(s, tau, max_rank, use_elbow) for s in flat], dtype=torch.int64)
    ranks = ranks.reshape(sigma.shape[:-1])
    rows = min(max_rank, sigma.shape[-1])
    A, B = A[..., :rows, :, :].clone(), B[..., :rows, :, :].clone()
    unused = torch.arange(rows) >= ranks.unsqueeze(-1)  # [..., R]
    A[unused] = 0.0
    B[unused] = 0.0
    return A, B, ranks


def stored_rows(m1: int, n1: int, m2: int, n2: int, max_rank: int) -> int:
    """``R = min(max_rank, min(m1·n1, m2·n2))``: the rows the factors are stored at, whatever rank the spectrum
    picks (what :func:`principal_terms` returns), so the shapes never depend on the weights."""
    return min(max_rank, m1 * n1, m2 * n2)


def _require_whole(*tensors: torch.Tensor) -> None:
    if any(isinstance(t, DTensor) for t in tensors):
        raise RuntimeError(
            "soka merge needs the whole weights in one process (a model rebuilt by `expertrain export`), not a "
            "tensor- or expert-parallel shard"
        )


# --- the modules --------------------------------------------------------------------------------------------------


class SoKALinear(nn.Linear):
    """``y = W_res x + b + Σ_k (A_k⊗B_k) x``. Takes over ``base``'s Parameters (names unchanged): ``weight`` becomes
    the frozen residual ``W − Σ_{k<r} A0_k⊗B0_k``; trainable ``soka_A [R, m1, n1]``, ``soka_B [R, m2, n2]`` start at
    the principal terms ``A0``, ``B0`` (kept as buffers ``soka_A0`` / ``soka_B0`` for the export).

    The constructor builds the structure only (zero factors; it runs on the meta device too); :meth:`decompose`
    sets the values from the base weight once it exists (sharded or whole).

    The factors are stored at ``R = min(max_rank, min(m1·n1, m2·n2))`` rows whatever the chosen rank ``r`` (buffer
    ``soka_rank``): rows ``k ≥ r`` are zero, get exactly zero gradients (``∂/∂A_k ∝ B_k = 0`` and vice versa) and stay
    zero under AdamW, so shapes do not depend on the weights and a checkpoint rebuilds on any model of the shape.

    ``out_multiple`` / ``in_multiple``: ``m1`` (``n1``) is chosen a multiple of it (:func:`kron_factors`), which
    tensor parallelism needs for a column-parallel (row-parallel) layer; see :meth:`tensor_parallel_placements`.
    """

    def __init__(
        self,
        base: nn.Linear,
        tau: float,
        max_rank: int,
        use_elbow: bool = True,
        out_multiple: int = 1,
        in_multiple: int = 1,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.m1, self.m2 = kron_factors(self.out_features, out_multiple)
        self.n1, self.n2 = kron_factors(self.in_features, in_multiple)
        self.tau, self.max_rank, self.use_elbow = tau, max_rank, use_elbow
        rows = stored_rows(self.m1, self.n1, self.m2, self.n2, max_rank)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.soka_A = nn.Parameter(torch.zeros(rows, self.m1, self.n1, **kw))
        self.soka_B = nn.Parameter(torch.zeros(rows, self.m2, self.n2, **kw))
        self.register_buffer("soka_A0", torch.zeros(rows, self.m1, self.n1, **kw))
        self.register_buffer("soka_B0", torch.zeros(rows, self.m2, self.n2, **kw))
        self.register_buffer("soka_rank", torch.zeros((), dtype=torch.int64, device=kw["device"]))

    @torch.no_grad()
    def decompose(self) -> None:
        """Split the current base weight into residual and principal terms (the factors, their copies ``A0`` /
        ``B0`` and the rank). On a sharded weight the whole matrix is gathered (a collective: every rank calls this
        for the same modules in the same order), decomposed in fp64 on the CPU, and each rank keeps its shards."""
        w = whole_tensor(self.weight)
        A, B, rank = principal_terms(w, self.m1, self.n1, self.tau, self.max_rank, self.use_elbow)
        write_whole(self.weight, (w.cpu().double() - kron_sum(A, B)).to(w.dtype))
        for name, value in (
            ("soka_A", A),
            ("soka_B", B),
            ("soka_A0", A),
            ("soka_B0", B),
            ("soka_rank", rank),
        ):
            write_whole(getattr(self, name), value)

    @property
    def rank(self) -> int:
        """The chosen Kronecker rank ``r`` (rows of the factors in use)."""
        return int(self.soka_rank)

    def trained_numel(self) -> int:
        """Trained entries of the ``r`` rows in use (what the method trains; the zero rows never move)."""
        return self.rank * (self.m1 * self.n1 + self.m2 * self.n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        A = self.soka_A
        if not isinstance(A, DTensor):
            return y + kron_apply(A, self.soka_B, x).to(y.dtype)
        # Tensor parallel: the base path runs on DTensors; the Kronecker term runs on this rank's parts (local_weight
        # marks replicated inputs' gradients as pending sums) and is re-wrapped: column-parallel, this rank's block
        # of i1 (its output rows, Shard(-1)); row-parallel, its block of j1 times its input columns (a partial sum).
        local = kron_apply(local_weight(A), local_weight(self.soka_B), local_weight(x)).to(y.dtype)
        colwise = A.placements[0] == Shard(1)
        placement: Placement = Shard(local.ndim - 1) if colwise else Partial()
        return y + DTensor.from_local(local, A.device_mesh, [placement], run_check=False)

    @staticmethod
    def tensor_parallel_placements(style: str) -> dict[str, Placement]:
        """Where tensor parallelism puts the factors, by the base layer's style. Column-parallel (``W`` ``Shard(0)``:
        rows ``i1·m2 + i2`` split contiguously, so with ``tp | m1`` each rank holds a block of ``i1``): ``soka_A``
        ``Shard(1)``, ``soka_B`` replicated. Row-parallel (``W`` ``Shard(1)``, ``tp | n1``): ``soka_A`` ``Shard(2)``,
        ``soka_B`` replicated; the term is then a partial sum like the base matmul. The buffers stay whole."""
        if style == "colwise":
            return {"soka_A": Shard(1), "soka_B": Replicate()}
        if style == "rowwise":
            return {"soka_A": Shard(2), "soka_B": Replicate()}
        raise ValueError(f"unknown tensor-parallel style {style!r}; expected 'colwise' or 'rowwise'")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W_res + Σ A_k⊗B_k`` (computed in fp32 at least)."""
        _require_whole(self.weight, self.soka_A)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = kron_sum(self.soka_A.detach().to(dtype), self.soka_B.detach().to(dtype))
        return (self.weight.detach().to(dtype) + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"out={self.m1}x{self.m2}, in={self.n1}x{self.n2}, r={self.rank}"


class ExpertKronecker(nn.Module):
    """Per-expert Kronecker factors of one fused expert weight ``[E, out, in]``: ``soka_A [E, R, m1, n1]``,
    ``soka_B [E, R, m2, n2]`` (trained), their start ``soka_A0`` / ``soka_B0`` and ``soka_rank [E]`` (buffers).

    Expert ``e`` uses rows ``k < soka_rank[e]`` (its own rank from its own spectrum); the rows past it are zero and
    never move (zero gradients, as in :class:`SoKALinear`), so every expert is stored at the layer's ``R``. Built
    zero (structure only); :meth:`decompose` sets the values from the whole weight."""

    def __init__(
        self,
        num_experts: int,
        out_features: int,
        in_features: int,
        max_rank: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        E = num_experts
        self.num_experts, self.out_features, self.in_features = E, out_features, in_features
        self.m1, self.m2 = kron_factors(out_features)
        self.n1, self.n2 = kron_factors(in_features)
        rows = stored_rows(self.m1, self.n1, self.m2, self.n2, max_rank)
        kw = {"device": device, "dtype": dtype}
        self.soka_A = nn.Parameter(torch.zeros(E, rows, self.m1, self.n1, **kw))
        self.soka_B = nn.Parameter(torch.zeros(E, rows, self.m2, self.n2, **kw))
        self.register_buffer("soka_A0", torch.zeros(E, rows, self.m1, self.n1, **kw))
        self.register_buffer("soka_B0", torch.zeros(E, rows, self.m2, self.n2, **kw))
        self.register_buffer("soka_rank", torch.zeros(E, dtype=torch.int64, device=device))

    @torch.no_grad()
    def decompose(self, weight_EOI: torch.Tensor, tau: float, max_rank: int, use_elbow: bool) -> list[int]:
        """The KPSVD of every expert of the whole weight ``weight_EOI [E, out, in]`` (a tensor the caller owns),
        one expert at a time (fp64 temporaries of one expert's size): each expert's matrix in ``weight_EOI`` is
        replaced in place by its residual; this rank's shards of the factors, their copies and the ranks are set.
        Returns every expert's rank."""
        A = torch.zeros(self.soka_A.shape, dtype=torch.float64)
        B = torch.zeros(self.soka_B.shape, dtype=torch.float64)
        ranks = torch.zeros(self.num_experts, dtype=torch.int64)
        for e in range(self.num_experts):
            A[e], B[e], ranks[e] = principal_terms(weight_EOI[e], self.m1, self.n1, tau, max_rank, use_elbow)
            residual = weight_EOI[e].cpu().double() - kron_sum(A[e], B[e])
            weight_EOI[e] = residual.to(weight_EOI.device, weight_EOI.dtype)
        for name, value in (
            ("soka_A", A),
            ("soka_B", B),
            ("soka_A0", A),
            ("soka_B0", B),
            ("soka_rank", ranks),
        ):
            write_whole(getattr(self, name), value)
        return [int(r) for r in ranks]

    @property
    def ranks(self) -> list[int]:
        """Every (held) expert's Kronecker rank."""
        return [int(r) for r in local_weight(self.soka_rank)]

    def trained_numel(self) -> int:
        """Trained entries of the rows in use, summed over the experts."""
        return sum(self.ranks) * (self.m1 * self.n1 + self.m2 * self.n2)

    def delta(self) -> torch.Tensor:
        """``Σ_k A_ek⊗B_ek`` of every held expert, ``[E_local, out, in]``."""
        return kron_sum(local_weight(self.soka_A), local_weight(self.soka_B))

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, out={self.m1}x{self.m2}, in={self.n1}x{self.n2}, "
            f"rows={self.soka_A.shape[1]}"
        )


def _hidden_slice(down_proj: torch.Tensor, local_hidden: int) -> slice:
    """This rank's columns of the hidden dimension ``I`` (all of them unless expert tensor parallelism split it)."""
    if isinstance(down_proj, DTensor):
        for mesh_dim, placement in enumerate(down_proj.placements):
            if placement.is_shard(2):
                start = down_proj.device_mesh.get_local_rank(mesh_dim) * local_hidden
                return slice(start, start + local_hidden)
    return slice(None)


class SoKAExperts(GroupedExperts):
    """Routed experts with per-expert SoKA: ``W_e = W_res,e + Σ_k A_ek⊗B_ek`` for ``gate_up_proj`` (as the
    ``[E, 2I, H]`` matrix it is in memory) and ``down_proj`` (``[E, H, I]``).

    Takes over ``base``'s weight Parameters (names unchanged; they become the frozen residuals) and adds
    :class:`ExpertKronecker` children ``soka_gate_up_proj`` / ``soka_down_proj``. Each forward builds the per-expert
    deltas and adds them to the weights, then runs the expert kernel unchanged. Expert parallelism cuts the factors
    and buffers with their experts (:meth:`per_expert_parameters`); under expert tensor parallelism each rank adds
    the columns (down) or gate/up rows of the delta that match its part of the hidden dimension."""

    def __init__(self, base: GroupedExperts, tau: float, max_rank: int, use_elbow: bool = True) -> None:
        self.init_from_base(base)  # not GroupedExperts.__init__: the weights are the base module's
        self.tau, self.max_rank, self.use_elbow = tau, max_rank, use_elbow
        E, H, hidden = base.num_experts, base.dim, base.hidden
        kw = {"device": base.gate_up_proj.device, "dtype": base.gate_up_proj.dtype}
        self.soka_gate_up_proj = ExpertKronecker(E, 2 * hidden, H, max_rank, **kw)
        self.soka_down_proj = ExpertKronecker(E, H, hidden, max_rank, **kw)

    @torch.no_grad()
    def decompose(self) -> list[tuple[int, int]]:
        """Split every expert of both fused weights into residual and principal terms, one fused weight at a time
        (gathered whole when sharded: a collective, see :meth:`SoKALinear.decompose`). Returns ``(rank, trained
        entries)`` of every expert matrix (``gate_up_proj``'s, then ``down_proj``'s)."""
        ranks: list[tuple[int, int]] = []
        for name, factors in self.factors().items():
            w = getattr(self, name)
            whole = whole_tensor(w).contiguous()
            matrix = whole.view(factors.num_experts, factors.out_features, factors.in_features)
            weight_ranks = factors.decompose(
                matrix, self.tau, self.max_rank, self.use_elbow
            )  # residual in place
            write_whole(w, whole)
            row = factors.m1 * factors.n1 + factors.m2 * factors.n2
            ranks += [(r, r * row) for r in weight_ranks]
        return ranks

    def factors(self) -> dict[str, ExpertKronecker]:
        """``{weight name: factors}`` (``gate_up_proj`` first)."""
        return {name: getattr(self, f"soka_{name}") for name in EXPERT_WEIGHTS}

    def per_expert_parameters(self) -> list[str]:
        """Every factor and buffer (dim 0 = experts): expert parallelism cuts them like the weights; over tensor
        parallelism they stay whole (replicated)."""
        names = ("soka_A", "soka_B", "soka_A0", "soka_B0", "soka_rank")
        return [f"soka_{w}.{t}" for w in EXPERT_WEIGHTS for t in names]

    def trained_parameter_names(self) -> list[str]:
        """The trained factors' names relative to this module."""
        return [f"soka_{w}.{t}" for w in EXPERT_WEIGHTS for t in ("soka_A", "soka_B")]

    def trained_numel(self) -> int:
        """Trained entries of the rows in use, over both weights and every expert."""
        return sum(f.trained_numel() for f in self.factors().values())

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        fn = EXPERT_IMPLS[resolve_impl(self.impl, x_ND.device)]
        w_gate_up_E2IH = local_weight(self.gate_up_proj)
        w_down_EHI = local_weight(self.down_proj)
        cols = _hidden_slice(self.down_proj, w_down_EHI.shape[-1])
        delta_E2IH = self.soka_gate_up_proj.delta().unflatten(1, (2, -1))[:, :, cols]
        delta_EHI = self.soka_down_proj.delta()[:, :, cols]
        w_gate_up_E2IH = w_gate_up_E2IH + delta_E2IH.to(w_gate_up_E2IH.dtype)
        w_down_EHI = w_down_EHI + delta_EHI.to(w_down_EHI.dtype)
        return fn(x_ND, w_gate_up_E2IH.flatten(1, 2), w_down_EHI, tokens_per_expert_E)

    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """``{weight name: W_res + ΔW}`` in the fused shapes (computed in fp32 at least)."""
        merged = {}
        for name, factors in self.factors().items():
            w = getattr(self, name)
            _require_whole(w, factors.soka_A)
            dtype = torch.promote_types(w.dtype, torch.float32)
            delta = kron_sum(factors.soka_A.detach().to(dtype), factors.soka_B.detach().to(dtype))
            merged[name] = (w.detach().to(dtype) + delta.reshape(w.shape)).to(w.dtype)
        return merged


# --- the transform ------------------------------------------------------------------------------------------------

_COLWISE = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "ffn.gate_proj", "ffn.up_proj")
_ROWWISE = ("attention.o_proj", "ffn.down_proj")


def tensor_parallel_style(path: str) -> str | None:
    """How :func:`framework.parallel.tensor_parallel.apply_tensor_parallel` splits the linear at ``path``:
    ``colwise``, ``rowwise``, or ``None`` for a layer outside its plan."""
    if path == "output" or path.endswith(_COLWISE):
        return "colwise"
    if path.endswith(_ROWWISE):
        return "rowwise"
    return None


def tensor_parallel_multiples(path: str, base: nn.Linear, tp: int) -> tuple[int, int]:
    """``(out_multiple, in_multiple)`` for the factorisation of the linear at ``path`` under ``tp``-way tensor
    parallelism: ``tp | m1`` for a column-parallel layer, ``tp | n1`` for a row-parallel one. A ConfigError names
    the module when its split dimension has no such factorisation."""
    if tp <= 1:
        return 1, 1
    style = tensor_parallel_style(path)
    if style is None:
        raise ConfigError(
            f"{SECTION}.targets",
            path,
            "expected modules that tensor parallelism splits (attention and dense-MLP projections, the LM head); "
            f"leave {path} out of soka.targets or set parallel.tp=1",
        )
    out_mult, in_mult = (tp, 1) if style == "colwise" else (1, tp)
    n = base.out_features if style == "colwise" else base.in_features
    if n % tp:
        raise ConfigError(
            "parallel.tp",
            tp,
            f"expected a divisor of {path}'s {'output' if style == 'colwise' else 'input'} size {n} (soka shards "
            f"its Kronecker factors with the layer); change parallel.tp or leave {path} out of soka.targets",
        )
    return out_mult, in_mult


def apply_soka(model: nn.Module, cfg: SoKAConfig, plugin: str = SECTION, tp: int = 1) -> Targets:
    """Replace every targeted ``nn.Linear`` by a :class:`SoKALinear` and, with ``cfg.target_experts``, every
    routed-experts module by a :class:`SoKAExperts`. Structure only (zero factors, base unchanged; works on the meta
    device): :func:`decompose_bases` splits the weights once they exist. ``tp``: the tensor-parallel degree the
    model will be split over (factorisations follow it, see :func:`kron_factors`)."""
    targets = select_targets(model, cfg.targets, cfg.target_experts, section=SECTION)
    changed = []
    embedding = getattr(getattr(model, "tok_embeddings", None), "weight", None)
    for path, base in targets.linears:
        if base.weight is embedding:  # the residual would overwrite the embedding too
            raise ConfigError(
                f"{SECTION}.targets",
                path,
                "expected no module whose weight is tied to the token embedding; leave the LM head out of "
                "soka.targets or set model.tie_embeddings=false",
            )
        claim(base, plugin, path)
        out_mult, in_mult = tensor_parallel_multiples(path, base, tp)
        module = SoKALinear(base, cfg.energy, cfg.max_rank, cfg.use_elbow, out_mult, in_mult)
        if (module.m1, module.n1) != (
            near_sqrt_factors(base.out_features)[0],
            near_sqrt_factors(base.in_features)[0],
        ):
            changed.append(f"{path} ({module.m1}x{module.m2}, {module.n1}x{module.n2})")
        claim(module, plugin, path)
        model.set_submodule(path, module)
    if changed:
        console.info(
            f"soka: parallel.tp={tp} needs other Kronecker factors than one rank for {len(changed)} modules: "
            f"{', '.join(changed)}; this run is not comparable to one with another tp"
        )
    for path, experts in targets.experts:
        claim(experts, plugin, path)
        module = SoKAExperts(experts, cfg.energy, cfg.max_rank, cfg.use_elbow)
        claim(module, plugin, path)
        model.set_submodule(path, module)
    return targets


@torch.no_grad()
def decompose_bases(model: nn.Module, plugin: str = SECTION) -> list[tuple[int, int]]:
    """Residual and principal terms of every module ``plugin`` adapted (:meth:`SoKALinear.decompose`,
    :meth:`SoKAExperts.decompose`), one weight at a time in model order: a collective on a sharded model. Returns
    ``(chosen rank, trained entries of the rows in use)`` per matrix (per linear, per expert and fused weight)."""
    ranks: list[tuple[int, int]] = []
    for _, m in soka_modules(model, plugin):
        m.decompose()
        ranks.append((m.rank, m.trained_numel()))
    for _, experts in soka_expert_modules(model, plugin):
        ranks += experts.decompose()
    return ranks


def soka_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, SoKALinear]]:
    """``(module path, module)`` of every linear ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, SoKALinear)


def soka_expert_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, SoKAExperts]]:
    """``(module path, module)`` of every routed-experts module ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, SoKAExperts)


def factor_parameter_names(model: nn.Module, plugin: str = SECTION) -> list[str]:
    """Names of every trained Kronecker factor (linears, then experts)."""
    names = [f"{path}.{t}" for path, _ in soka_modules(model, plugin) for t in ("soka_A", "soka_B")]
    for path, m in soka_expert_modules(model, plugin):
        names += [f"{path}.{n}" for n in m.trained_parameter_names()]
    return names


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: SoKAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: SoKAConfig = getattr(config, SECTION)
    if isinstance(cfg.targets, list) and not cfg.targets and not cfg.target_experts:
        raise ConfigError(
            f"{SECTION}.targets",
            cfg.targets,
            f"expected module-name suffixes, a regex or '{ALL_LINEAR}' (an empty list needs "
            f"{SECTION}.target_experts=true)",
        )


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: SoKAConfig = getattr(config, SECTION)
    targets = apply_soka(model, cfg, tp=config.parallel.tp)
    factors = set(factor_parameter_names(model))
    stored = sum(p.numel() for name, p in model.named_parameters() if name in factors)
    detail = (
        f"Kronecker ranks from each base's spectrum at init (energy {cfg.energy:g}"
        f"{', elbow' if cfg.use_elbow else ''}, max {cfg.max_rank}"
        f"{', per expert' if soka_expert_modules(model) else ''}; factors stored at the max)"
    )
    saved, count = coverage_detail(model, resolve(model, cfg.modules_to_save, SECTION))
    if saved:
        detail += f"; {saved}"
    console.info(format_coverage(SECTION, model, targets, stored + count, detail))


@hookimpl
def expertrain_init_weights(model: nn.Module) -> None:
    """The decompositions of the (possibly sharded) base weights: ``model.init_from`` is loaded by now."""
    decomposed = decompose_bases(model)
    ranks = [r for r, _ in decomposed]
    factors = set(factor_parameter_names(model))
    stored = sum(p.numel() for name, p in model.named_parameters() if name in factors)
    console.info(
        f"soka: decomposed {len(ranks)} matrices; Kronecker ranks {min(ranks)}-{max(ranks)} "
        f"(mean {sum(ranks) / len(ranks):.2f}); {sum(n for _, n in decomposed):,} trained entries in the rows in use "
        f"of {stored:,} stored"
    )


@hookimpl
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str]:
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    return factor_parameter_names(model) + trainable_names(saved)


@hookimpl
def expertrain_merge_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The streamed ``export hf --merge``: ``W_res + Σ A_k⊗B_k`` for base tensor ``name`` (the arithmetic of
    ``merged_weight`` / ``merged_weights``, on the checkpoint's ``W_res``)."""
    path, _, weight = name.rpartition(".")
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    linear = dict(soka_modules(model)).get(path)
    if linear is not None and weight == "weight":
        delta = kron_sum(linear.soka_A.detach().to(dtype), linear.soka_B.detach().to(dtype))
        return (tensor.to(dtype) + delta).to(tensor.dtype)
    experts = dict(soka_expert_modules(model)).get(path)
    factors = experts.factors().get(weight) if experts is not None else None
    if factors is None:
        return None
    delta = kron_sum(factors.soka_A.detach().to(dtype), factors.soka_B.detach().to(dtype))
    return (tensor.to(dtype) + delta.reshape(tensor.shape)).to(tensor.dtype)


@hookimpl
def expertrain_merge_adapters(model: nn.Module) -> list[str] | None:
    """Fold ``Σ A_k⊗B_k`` into each residual weight and leave plain ``nn.Linear`` / ``GroupedExperts`` modules."""
    merged = []
    for path, module in soka_modules(model):
        with torch.no_grad():
            module.weight.copy_(module.merged_weight())
        restore_plain_linear(model, path, module)
        merged.append(path)
    for path, experts in soka_expert_modules(model):
        with torch.no_grad():
            for name, value in experts.merged_weights().items():
                getattr(experts, name).copy_(value)
        restore_plain_experts(model, path, experts)
        merged.append(path)
    return merged or None


def soka_tensors(model: nn.Module, plugin: str = SECTION) -> dict[str, torch.Tensor]:
    """Per linear (transformers path ``p``): ``p.soka_A [r, m1, n1]``, ``p.soka_B [r, m2, n2]`` (trained) and
    ``p.soka_A0`` / ``p.soka_B0`` (initial principal terms), ``r`` rows each. Per expert weight (``p`` =
    ``<experts path>.gate_up_proj`` / ``.down_proj``): ``p.soka_A [E, r, m1, n1]`` ... at ``r`` = the largest expert
    rank (expert ``e``'s rows past its own rank are zero) and ``p.soka_rank [E]``."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in soka_modules(model, plugin):
        hf = hf_module_path(path)
        for name in ("soka_A", "soka_B", "soka_A0", "soka_B0"):
            tensors[f"{hf}.{name}"] = getattr(m, name).detach().cpu()[: m.rank]
    for path, m in soka_expert_modules(model, plugin):
        for weight, f in m.factors().items():
            hf = f"{hf_module_path(path)}.{weight}"
            rows = max(f.ranks)
            for name in ("soka_A", "soka_B", "soka_A0", "soka_B0"):
                tensors[f"{hf}.{name}"] = getattr(f, name).detach().cpu()[:, :rows]
            tensors[f"{hf}.soka_rank"] = f.soka_rank.detach().cpu()
    return tensors


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format != EXPORT_FORMAT:
        return None
    cfg: SoKAConfig = getattr(config, SECTION)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = resolve(model, cfg.modules_to_save, SECTION)
    tensors = {k: v.contiguous().clone() for k, v in soka_tensors(model).items()}
    tensors.update(hf_tensors(model, saved))
    save_file(tensors, str(out / "soka_model.safetensors"), metadata={"format": "pt"})
    modules: dict[str, Any] = {
        hf_module_path(p): {"out": [m.m1, m.m2], "in": [m.n1, m.n2], "r": m.rank}
        for p, m in soka_modules(model)
    }
    for path, m in soka_expert_modules(model):
        for weight, f in m.factors().items():
            modules[f"{hf_module_path(path)}.{weight}"] = {
                "out": [f.m1, f.m2],
                "in": [f.n1, f.n2],
                "r": f.ranks,
                "experts": f.num_experts,
            }
    meta = {
        "method": "SOKA",
        "base_model_name_or_path": config.model.init_from or None,
        "energy": cfg.energy,
        "max_rank": cfg.max_rank,
        "use_elbow": cfg.use_elbow,
        "modules": modules,
        "apply": "W += sum_k kron(soka_A[k], soka_B[k]) - sum_k kron(soka_A0[k], soka_B0[k]) on the original base",
        "apply_experts": "per expert e of the fused weight (gate_up_proj as [E, 2I, H], gate rows first; down_proj "
        "[E, H, I]): W[e] += sum_k kron(soka_A[e, k], soka_B[e, k]) - sum_k kron(soka_A0[e, k], soka_B0[e, k])",
        **format_fields(model, saved),
        "apply_modules_to_save": "the tensors named <module>.<tensor> (lm_head.weight, model.norm.weight) replace "
        "the base model's tensors of those names",
    }
    (out / "soka_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["soka_model.safetensors", "soka_config.json"]


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    n = len(soka_modules(model)) + len(soka_expert_modules(model))
    summary["lines"].append(
        f"soka            {n} adapted modules; export with "
        f"`expertrain export {EXPORT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>` "
        "or `expertrain export hf --merge`"
    )
