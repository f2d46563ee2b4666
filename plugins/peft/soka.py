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
card's ``vec(B X Aᵀ)`` in column-major order). The decomposition runs in fp64 on the CPU on the whole weight,
before parallelisation, so every rank gets the same factors.

Parallelism: data parallelism (DDP, FSDP2); tensor and expert parallelism and routed experts are refused.
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

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.observe import console
from plugins.peft.low_rank import hf_module_path
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    check_target_spec,
    claim,
    format_coverage,
    owned_modules,
    refuse_model_parallel,
    select_targets,
)

SECTION = "soka"
EXPORT_FORMAT = "soka"


@dataclass
class SoKAConfig:
    """SoKA (arXiv 2506.15251): trained principal Kronecker terms of each targeted linear, frozen residual."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to adapt: module-name suffixes (q_proj, ffn.down_proj, ...), a regular expression matched "
        "against whole module paths, or 'all-linear' (every nn.Linear except the LM head).",
    )
    target_experts: bool = option(
        False, doc="Routed experts: not supported by soka (must stay false); use lora for the experts."
    )
    energy: float = option(
        0.9,
        doc="Energy threshold tau: the energy rank is the smallest r with sum_{k<=r} s_k^2 / sum s_k^2 >= tau.",
        min=0.0,
        min_exclusive=True,
        max=1.0,
    )
    max_rank: int = option(8, doc="Cap on every layer's Kronecker rank.", min=1)
    use_elbow: bool = option(
        True, doc="Take the smaller of the energy rank and the elbow rank (false: the energy rank alone)."
    )


# --- the math -----------------------------------------------------------------------------------------------------


def near_sqrt_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a·b = n`` and ``a`` the largest divisor of ``n`` that is ``≤ √n``."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def rearrange(w: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """Van Loan–Pitsianis ``R(W) [m1·n1, m2·n2]``: row ``i1·n1 + j1`` is the row-major vec of block ``(i1, j1)``
    ``[m2, n2]`` of ``w [m1·m2, n1·n2]``. ``R(A⊗B) = vec(A) vec(B)ᵀ``; not a plain reshape of ``w``."""
    m, n = w.shape
    m2, n2 = m // m1, n // n1
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum(A_rMN: torch.Tensor, B_rPQ: torch.Tensor) -> torch.Tensor:
    """``Σ_k A_k⊗B_k`` ``[m1·m2, n1·n2]`` (``torch.kron`` layout) of ``A [r, m1, n1]``, ``B [r, m2, n2]``."""
    r, m1, n1 = A_rMN.shape
    _, m2, n2 = B_rPQ.shape
    return torch.einsum("rac,rbd->abcd", A_rMN, B_rPQ).reshape(m1 * m2, n1 * n2)


def kron_apply(A_rMN: torch.Tensor, B_rPQ: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(Σ_k A_k⊗B_k) x`` for ``x [..., n1·n2]`` without building the matrix: ``vec(A_k X B_kᵀ)`` with ``X = x``
    reshaped ``[n1, n2]``. Returns ``[..., m1·m2]``."""
    _, _, n1 = A_rMN.shape
    X = x.unflatten(-1, (n1, -1))
    T = torch.einsum("...cd,rbd->...rcb", X, B_rPQ)  # X B_kᵀ: [..., r, n1, m2]
    return torch.einsum("rac,...rcb->...ab", A_rMN, T).flatten(-2)


@torch.no_grad()
def kpsvd(w: torch.Tensor, m1: int, n1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kronecker-product SVD of ``w`` in fp64: ``A [p, m1, n1]``, ``B [p, m2, n2]`` (all ``p = min(m1·n1, m2·n2)``
    terms, ``A_k = unvec(√σ_k u_k)``, ``B_k = unvec(√σ_k v_k)``) and ``σ [p]`` (descending)."""
    m, n = w.shape
    m2, n2 = m // m1, n // n1
    U, S, Vh = torch.linalg.svd(rearrange(w.detach().cpu().double(), m1, n1), full_matrices=False)
    root = S.sqrt()
    A = (U * root).T.reshape(-1, m1, n1)
    B = (Vh * root[:, None]).reshape(-1, m2, n2)
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


# --- the module ---------------------------------------------------------------------------------------------------


class SoKALinear(nn.Linear):
    """``y = W_res x + b + Σ_k (A_k⊗B_k) x``. Takes over ``base``'s Parameters (names unchanged): ``weight`` becomes
    the frozen residual ``W − Σ_{k<r} A0_k⊗B0_k``; trainable ``soka_A [R, m1, n1]``, ``soka_B [R, m2, n2]`` start at
    the principal terms ``A0``, ``B0`` (kept as buffers ``soka_A0`` / ``soka_B0`` for the export).

    The factors are stored at ``R = min(max_rank, min(m1·n1, m2·n2))`` rows whatever the chosen rank ``r`` (buffer
    ``soka_rank``): rows ``k ≥ r`` are zero, get exactly zero gradients (``∂/∂A_k ∝ B_k = 0`` and vice versa) and stay
    zero under AdamW, so shapes do not depend on the weights and a checkpoint rebuilds on any model of the shape."""

    def __init__(self, base: nn.Linear, tau: float, max_rank: int, use_elbow: bool = True) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.m1, self.m2 = near_sqrt_factors(self.out_features)
        self.n1, self.n2 = near_sqrt_factors(self.in_features)
        w = base.weight
        A, B, sigma = kpsvd(w, self.m1, self.n1)
        r = choose_rank(sigma, tau, max_rank, use_elbow)
        rows = min(max_rank, sigma.numel())
        A[r:] = 0.0
        B[r:] = 0.0
        A, B = A[:rows], B[:rows]
        with torch.no_grad():
            w.copy_((w.detach().cpu().double() - kron_sum(A, B)).to(w.device, w.dtype))
        self.soka_A = nn.Parameter(A.to(w.device, w.dtype).contiguous())
        self.soka_B = nn.Parameter(B.to(w.device, w.dtype).contiguous())
        self.register_buffer("soka_A0", A.to(w.device, w.dtype).contiguous().clone())
        self.register_buffer("soka_B0", B.to(w.device, w.dtype).clone())
        self.register_buffer("soka_rank", torch.tensor(r, dtype=torch.int64, device=w.device))

    @property
    def rank(self) -> int:
        """The chosen Kronecker rank ``r`` (rows of the factors in use)."""
        return int(self.soka_rank)

    def trained_numel(self) -> int:
        """Trained entries of the ``r`` rows in use (what the method trains; the zero rows never move)."""
        return self.rank * (self.m1 * self.n1 + self.m2 * self.n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + kron_apply(self.soka_A, self.soka_B, x).to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W_res + Σ A_k⊗B_k`` (computed in fp32 at least)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = kron_sum(self.soka_A.detach().to(dtype), self.soka_B.detach().to(dtype))
        return (self.weight.detach().to(dtype) + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"out={self.m1}x{self.m2}, in={self.n1}x{self.n2}, r={self.rank}"


def apply_soka(model: nn.Module, cfg: SoKAConfig, plugin: str = SECTION) -> list[tuple[str, nn.Linear]]:
    """Replace every targeted ``nn.Linear`` by a :class:`SoKALinear` (residual + principal Kronecker terms)."""
    targets = select_targets(model, cfg.targets, False, section=SECTION)
    for path, base in targets.linears:
        claim(base, plugin, path)
        module = SoKALinear(base, cfg.energy, cfg.max_rank, cfg.use_elbow)
        claim(module, plugin, path)
        model.set_submodule(path, module)
    return targets.linears


def soka_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, SoKALinear]]:
    """``(module path, module)`` of every module ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, SoKALinear)


def factor_parameter_names(model: nn.Module, plugin: str = SECTION) -> list[str]:
    """Names of every trained Kronecker factor."""
    return [f"{path}.{t}" for path, _ in soka_modules(model, plugin) for t in ("soka_A", "soka_B")]


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: SoKAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: SoKAConfig = getattr(config, SECTION)
    if cfg.target_experts:
        raise ConfigError(
            f"{SECTION}.target_experts",
            True,
            "expected false: soka does not adapt the fused routed experts (per-expert KPSVD is not implemented); "
            "adapt them with lora.target_experts",
        )
    check_target_spec(SECTION, cfg.targets)
    refuse_model_parallel(config, SECTION, "tensor and expert parallelism are not supported")


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: SoKAConfig = getattr(config, SECTION)
    linears = apply_soka(model, cfg)
    modules = soka_modules(model)
    trainable = sum(m.trained_numel() for _, m in modules)
    ranks = sorted({m.rank for _, m in modules})
    detail = (
        f"Kronecker ranks {ranks[0]}-{ranks[-1]} (energy {cfg.energy:g}"
        f"{', elbow' if cfg.use_elbow else ''}, max {cfg.max_rank})"
    )
    console.info(format_coverage(SECTION, model, Targets(linears=linears), trainable, detail))


@hookimpl
def expertrain_trainable_parameters(model: nn.Module) -> list[str]:
    return factor_parameter_names(model)


@hookimpl
def expertrain_merge_adapters(model: nn.Module) -> list[str] | None:
    """Fold ``Σ A_k⊗B_k`` into each residual weight and leave plain ``nn.Linear`` modules."""
    merged = []
    for path, module in soka_modules(model):
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        with torch.no_grad():
            module.weight.copy_(module.merged_weight())
        plain.weight, plain.bias = module.weight, module.bias
        model.set_submodule(path, plain)
        merged.append(path)
    return merged or None


def soka_tensors(model: nn.Module, plugin: str = SECTION) -> dict[str, torch.Tensor]:
    """Per module (transformers path ``p``): ``p.soka_A [r, m1, n1]``, ``p.soka_B [r, m2, n2]`` (trained) and
    ``p.soka_A0`` / ``p.soka_B0`` (initial principal terms), ``r`` rows each."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in soka_modules(model, plugin):
        hf = hf_module_path(path)
        for name in ("soka_A", "soka_B", "soka_A0", "soka_B0"):
            tensors[f"{hf}.{name}"] = getattr(m, name).detach().cpu()[: m.rank]
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
    tensors = {k: v.contiguous().clone() for k, v in soka_tensors(model).items()}
    save_file(tensors, str(out / "soka_model.safetensors"), metadata={"format": "pt"})
    meta = {
        "method": "SOKA",
        "base_model_name_or_path": config.model.init_from or None,
        "energy": cfg.energy,
        "max_rank": cfg.max_rank,
        "use_elbow": cfg.use_elbow,
        "modules": {
            hf_module_path(p): {"out": [m.m1, m.m2], "in": [m.n1, m.n2], "r": m.rank}
            for p, m in soka_modules(model)
        },
        "apply": "W += sum_k kron(soka_A[k], soka_B[k]) - sum_k kron(soka_A0[k], soka_B0[k]) on the original base",
    }
    (out / "soka_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["soka_model.safetensors", "soka_config.json"]


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    summary["lines"].append(
        f"soka            {len(soka_modules(model))} adapted modules; export with "
        f"`expertrain export {EXPORT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>` "
        "or `expertrain export hf --merge`"
    )
