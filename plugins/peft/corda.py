"""CorDA: context-oriented decomposition adaptation (arXiv 2406.05223). Plugin ``corda``.

Every targeted ``nn.Linear`` ``W [out, in]`` becomes a :class:`CorDALinear`, a
:class:`~plugins.peft.low_rank.LoRALinear` whose frozen base is the residual of a context-weighted SVD::

    C   = mean over calibration samples of XᵀX,  X [tokens, in] the layer's input scaled by 1 / max|X| per sample
    C̃   = C + d·mean(diag C)·I,   d = 0.01, doubled until ‖C̃C̃⁻¹ − I‖_F < 0.05
    W C̃ = U S Vᵀ,   V̂ᵀ = Vᵀ C̃⁻¹   (so W = U S V̂ᵀ)
    ipm: the r LARGEST components, kpm: the r SMALLEST;  A₀ = √(S_r/s)·V̂_rᵀ,  B₀ = U_r·√(S_r/s)
    y = (W − s·B₀A₀) x + s·B·A·x,   B = B₀, A = A₀ at step 0, s = alpha / r

so the model is unchanged at step 0 and only ``A`` / ``B`` train. ``B₀`` / ``A₀`` are kept (buffers saved through
the plugin's checkpoint state) for the export on the ORIGINAL base: ``ΔW = s·(BA − B₀A₀)`` as a rank-``2r`` peft LoRA
``B′ = [B | −B₀]``, ``A′ = [A; A₀]`` with alpha ``2·alpha`` (same scale ``s``).

With ``target_experts`` every routed-experts module becomes a :class:`~plugins.peft.low_rank.LoRAExperts` whose
per-expert adapters (:class:`CorDAExpertsLoRA`) are decomposed the same way, expert by expert: ``gate_up_proj``
(as ``[E, 2I, H]``) with the covariance of the rows routed to expert ``e`` (``X_e [tokens_e, H]``), ``down_proj``
(``[E, H, I]``) with that of the expert's hidden activation ``swiglu(X_e W_gate_up,eᵀ) [tokens_e, I]``; each sample's
rows are scaled by their own ``max|X|`` and ``C_e`` averages over the samples that routed at least one row to ``e``
(routing as a one-rank forward of the calibration batch, capacity rules included). An expert that receives no
calibration row (or only zeros) is decomposed with ``C = I``: a plain SVD of its weight. The residuals are written
into the fused weights.

The transform only changes structure (the model is built and parallelised on the meta device); the adapters and
``B₀`` / ``A₀`` are set to 0 in ``expertrain_init_weights`` (each rank's shards), so the calibration forward computes
the base. Calibration runs in ``expertrain_after_parallelize`` (skipped when resuming, as the checkpoint holds the
result) on
every rank over the same samples (the first ``calibration_samples`` sequences of the calibration data, a
deterministic draw). Every rank computes the covariance of each layer's WHOLE input and decomposes the WHOLE weight
(gathered from FSDP / tensor / expert shards) in fp64, so all ranks get the same factors and write their own shards:

- data parallelism (DDP, FSDP2): the inputs are whole on every rank; no collective besides the weight gathers;
- tensor parallelism: a row-parallel layer (``o_proj``, ``down_proj``) sees its input columns only, so the hook
  gathers the input (``full_tensor``); the adapters follow the base layer as in LoRA; an MoE layer routes its
  sequence slice, so the routed tokens are gathered over the tensor-parallel ranks and put back in sequence order;
- expert parallelism: every rank routes the same calibration tokens, so it sees every expert's rows before the
  all-to-all; the per-expert ``A`` / ``B`` are cut with their experts, ``A₀`` / ``B₀`` stay whole on every rank
  (export-only constants, ``E·r·(in + out)`` values per weight). Expert tensor parallelism (``etp = tp``) works the
  same way (the weights are gathered whole for the decomposition; each rank writes its hidden slice).

DeepSpeed with ``ep > 1`` keeps plain expert slices, which the decomposition cannot gather: ``target_experts`` is
refused there. The reference implementations: peft ``src/peft/tuners/lora/corda.py``, iboing/CorDA
``cordalib/decomposition.py``; peft divides by ``max(X)`` (signed) where the paper card says ``max|X|``, which we use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from framework.comm import collectives as C
from framework.config import ConfigError, JobConfig, option
from framework.hooks import PluginError, hookimpl
from framework.models.moe import LocalDispatcher
from framework.models.sharding import local_part
from framework.observe import console
from plugins.peft.low_rank import (
    ExpertsLoRA,
    LoRAExperts,
    LoRALinear,
    experts_to_peft,
    hf_module_path,
    merge_into_tensor,
    peft_key,
    peft_param_wrapper_paths,
    write_adapter,
)
from plugins.peft.modules_to_save import (
    coverage_detail,
    format_fields,
    modules_to_save_option,
    native_tensors,
    peft_fields,
    resolve,
    trainable_names,
)
from plugins.peft.modules_to_save import peft_tensors as saved_peft_tensors
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    check_target_spec,
    claim,
    format_coverage,
    owned_modules,
    restore_plain_linear,
    select_targets,
)

SECTION = "corda"
PEFT_FORMAT = "peft"
CORDA_FORMAT = "corda"
CordaMode = Literal["ipm", "kpm"]

DAMP_START = 0.01
INV_TOL = 0.05
MAX_DOUBLINGS = 60
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass
class CorDAConfig:
    """CorDA adapters (arXiv 2406.05223): LoRA initialised from a context-weighted SVD, residual base frozen."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to adapt: a list of module-name suffixes (q_proj, attention.o_proj, ...), a regular expression "
        "matched against whole module paths, or 'all-linear' (every nn.Linear except the LM head); [] with "
        "target_experts adapts the routed experts only.",
    )
    target_experts: bool = option(
        False,
        doc="Also adapt the fused routed-expert weights gate_up_proj and down_proj, one decomposition per expert "
        "(covariances from the tokens routed to it).",
    )
    r: int = option(8, doc="Rank of every adapter (components adapted per layer).", min=1)
    alpha: float = option(8.0, doc="Alpha: the delta is scaled by alpha / r.", min=0.0, min_exclusive=True)
    mode: CordaMode = option(
        "ipm",
        doc="ipm (instruction-previewed: adapt the r largest components; calibrate on the task's data) or kpm "
        "(knowledge-preserved: adapt the r smallest; calibrate on data whose knowledge must be kept).",
    )
    calibration_paths: list[str] = option(
        default_factory=list,
        doc="Indexed dataset prefixes (expertrain data prepare) to calibrate on; empty = the job's data section "
        "(the embedded corpus by default).",
    )
    calibration_samples: int = option(256, doc="Calibration sequences.", min=1)
    calibration_seq_len: int = option(0, doc="Tokens per calibration sequence; 0 = data.seq_len.", min=0)
    calibration_batch_size: int = option(8, doc="Sequences per calibration forward.", min=1)
    seed: int = option(0, doc="Seed of the calibration sample draw (the same on every rank).", min=0)
    modules_to_save: list[str] = modules_to_save_option()


# --- the adapted modules ------------------------------------------------------------------------------------------


class CorDALinear(LoRALinear):
    """A :class:`LoRALinear` on the residual base ``W − s·B₀A₀`` that also keeps ``B₀ [out, r]`` / ``A₀ [r, in]``
    (non-persistent buffers ``lora_B0`` / ``lora_A0``: the plugin saves them) for the export on the original base."""

    lora_A0: torch.Tensor
    lora_B0: torch.Tensor

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__(base, r, alpha)
        w = base.weight
        self.register_buffer("lora_A0", torch.zeros(r, self.in_features, device=w.device), persistent=False)
        self.register_buffer("lora_B0", torch.zeros(self.out_features, r, device=w.device), persistent=False)


class CorDAExpertsLoRA(ExpertsLoRA):
    """An :class:`ExpertsLoRA` that also keeps every expert's initial factors ``A₀ [E, r, in]`` / ``B₀ [E, out, r]``
    (non-persistent buffers ``lora_A0`` / ``lora_B0``, saved by the plugin). They are not per-expert parameters of
    the owning :class:`LoRAExperts`, so expert parallelism leaves them whole on every rank (export-only constants)."""

    lora_A0: torch.Tensor
    lora_B0: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, in_features, out_features, r, alpha, device=device, dtype=dtype)
        E = num_experts
        self.register_buffer("lora_A0", torch.zeros(E, r, in_features, device=device), persistent=False)
        self.register_buffer("lora_B0", torch.zeros(E, out_features, r, device=device), persistent=False)


def corda_modules(model: nn.Module) -> list[tuple[str, CorDALinear]]:
    """``(module path, module)`` of every linear module the plugin adapted, in model order."""
    return owned_modules(model, SECTION, CorDALinear)


def corda_experts(model: nn.Module) -> list[tuple[str, LoRAExperts]]:
    """``(module path, module)`` of every routed-experts module the plugin adapted (``target_experts``)."""
    return owned_modules(model, SECTION, LoRAExperts)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every trainable adapter tensor."""
    names = [f"{p}.lora.{t}" for p, _ in corda_modules(model) for t in ("lora_A", "lora_B")]
    return names + [f"{p}.{n}" for p, m in corda_experts(model) for n in m.per_expert_parameters()]


def initial_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``B₀`` / ``A₀`` buffer by checkpoint key: ``<linear path>.lora_A0`` and
    ``<experts path>.lora_<weight>.lora_A0`` (and ``lora_B0``)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        out[f"{path}.lora_A0"], out[f"{path}.lora_B0"] = m.lora_A0, m.lora_B0
    for path, experts in corda_experts(model):
        for name, lora in experts.adapters().items():
            out[f"{path}.lora_{name}.lora_A0"], out[f"{path}.lora_{name}.lora_B0"] = (
                lora.lora_A0,
                lora.lora_B0,
            )
    return out


def _check_rank(path: str, r: int, out_features: int, in_features: int) -> None:
    if min(in_features, out_features) < r:
        raise ConfigError(
            f"{SECTION}.r", r, f"expected at most min(out, in) = {min(in_features, out_features)} for {path}"
        )


def apply_corda(model: nn.Module, cfg: CorDAConfig) -> Targets:
    """Wrap every targeted linear (in place) in a :class:`CorDALinear` and, with ``target_experts``, every
    routed-experts module in a :class:`LoRAExperts` with :class:`CorDAExpertsLoRA` adapters, all zero: the model is
    unchanged until :func:`calibrate_and_init` decomposes the weights."""
    targets = select_targets(model, cfg.targets, cfg.target_experts, section=SECTION)
    for path, base in targets.linears:
        _check_rank(path, cfg.r, base.out_features, base.in_features)
        claim(base, SECTION, path)
        module = CorDALinear(base, cfg.r, cfg.alpha)
        claim(module, SECTION, path)
        model.set_submodule(path, module)
    for path, experts in targets.experts:
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        if not callable(getattr(parent, "register_dispatch_observer", None)):
            raise ConfigError(
                f"{SECTION}.target_experts",
                True,
                f"expected the routed experts {path} inside an MoE block (framework.models.moe.MoEBlock: the "
                "calibration observes its routed tokens); set it to false for this block",
            )
        E, H, hidden = experts.num_experts, experts.dim, experts.hidden
        w = experts.gate_up_proj
        adapters: dict[str, CorDAExpertsLoRA] = {}
        for name, (d_in, d_out) in zip(EXPERT_WEIGHTS, ((H, 2 * hidden), (hidden, H))):
            _check_rank(f"{path}.{name}", cfg.r, d_out, d_in)
            adapters[f"lora_{name}"] = CorDAExpertsLoRA(E, d_in, d_out, cfg.r, cfg.alpha, w.device, w.dtype)
        claim(experts, SECTION, path)
        module = LoRAExperts(experts, **adapters)
        claim(module, SECTION, path)
        model.set_submodule(path, module)
    return targets


@torch.no_grad()
def zero_adapters(model: nn.Module) -> None:
    """Every adapter and ``B₀`` / ``A₀`` of the plugin at 0 (this rank's shards): the model computes its base until
    :func:`calibrate_and_init` decomposes the weights. After the meta-device build these tensors hold whatever the
    allocation left, which the calibration forward must not see."""
    params = dict(model.named_parameters())
    for name in adapter_parameter_names(model):
        local_part(params[name]).zero_()
    for buffer in initial_factors(model).values():
        local_part(buffer).zero_()


# --- the math -----------------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """``W = U·diag(S)·V̂ᵀ`` from ``SVD(W C̃)``; ``damping`` is the final ``d`` and ``C̃⁻¹`` its inverse."""

    U: torch.Tensor
    S: torch.Tensor
    Vhat_T: torch.Tensor
    damping: float


def damped_inverse(C: torch.Tensor, tol: float = INV_TOL) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C̃, C̃⁻¹, d)``: ``C̃ = C + d·mean(diag C)·I`` with ``d`` from 0.01, doubled until
    ``‖C̃C̃⁻¹ − I‖_F < tol`` (0.05: the reference's invertibility test). Computed in ``C``'s dtype (use fp64)."""
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    mean_diag = torch.diagonal(C).mean()
    if not mean_diag > 0:
        raise ValueError("the calibration covariance is zero: the layer saw no non-zero input")
    d = DAMP_START
    for _ in range(MAX_DOUBLINGS):
        C_damped = C + d * mean_diag * eye
        inv, info = torch.linalg.inv_ex(C_damped)
        if info == 0 and torch.dist(C_damped @ inv, eye) < tol:
            return C_damped, inv, d
        d *= 2
    raise ValueError(f"the calibration covariance stayed singular after damping with d = {d:g}")


def decompose(W: torch.Tensor, C: torch.Tensor) -> Decomposition:
    """Context-oriented SVD of ``W [out, in]`` with the input covariance ``C [in, in]`` (both cast to fp64)."""
    W, C = W.double(), C.double()
    C_damped, C_inv, d = damped_inverse(C)
    U, S, Vh = torch.linalg.svd(W @ C_damped, full_matrices=False)
    return Decomposition(U, S, Vh @ C_inv, d)


def corda_factors(
    dec: Decomposition, r: int, mode: CordaMode, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B₀ [out, r], A₀ [r, in])``: ``B₀ = U_r·√(S_r/s)``, ``A₀ = √(S_r/s)·V̂_rᵀ`` of the ``r`` largest (ipm) or
    smallest (kpm) components, so ``s·B₀A₀ = U_r S_r V̂_rᵀ``."""
    idx = slice(0, r) if mode == "ipm" else slice(dec.S.shape[0] - r, dec.S.shape[0])
    root = torch.sqrt(dec.S[idx] / scaling)
    return dec.U[:, idx] * root, root[:, None] * dec.Vhat_T[idx]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _normalised_gram(
    rows: torch.Tensor, sample_of_row: torch.Tensor, samples: int
) -> tuple[torch.Tensor, int]:
    """``(Σ X̄ᵀX̄, number of samples with a row)``: ``rows [N, in]`` (fp64) of ``samples`` calibration samples,
    ``sample_of_row [N]``; each sample's rows are divided by their own ``max|X|``."""
    peak = rows.new_zeros(samples).scatter_reduce_(0, sample_of_row, rows.abs().amax(dim=-1), "amax")
    scaled = rows / peak.clamp_min(torch.finfo(rows.dtype).tiny)[sample_of_row, None]
    present = int((torch.bincount(sample_of_row, minlength=samples) > 0).sum())
    return scaled.T @ scaled, present


class CovarianceCollector:
    """Accumulates per target module ``Σ_samples X̄ᵀX̄`` with ``X̄ = X / max|X|`` per sample, in fp64, from
    forward pre-hooks; :meth:`covariances` averages over the samples seen. A tensor-parallel input (a DTensor, e.g.
    the column shard a row-parallel layer receives) is gathered whole first, so every rank sees the whole input."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(path)) for path, m in modules]

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = _full(args[0].detach()).double()
            x_BTD = x.reshape(x.shape[0], -1, x.shape[-1])  # one calibration sample per leading index
            peak_B = x_BTD.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
            x_BTD = x_BTD / peak_B[:, None, None]
            cov = torch.einsum("bti,btj->ij", x_BTD, x_BTD)
            self.sums[path] = self.sums[path] + cov if path in self.sums else cov
            self.samples[path] = self.samples.get(path, 0) + x_BTD.shape[0]

        return hook

    def covariances(self) -> dict[str, torch.Tensor]:
        return {p: s / self.samples[p] for p, s in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class ExpertCovarianceCollector:
    """Per-expert covariances of the routed experts' inputs: for ``gate_up_proj`` the rows routed to expert ``e``
    (``X_e [tokens_e, H]``), for ``down_proj`` its hidden activation ``swiglu(X_e W_gate_up,eᵀ) [tokens_e, I]``;
    each sample's rows scaled by their own ``max|X|``, summed in fp64 (:meth:`covariances` averages over the samples
    that reached the expert).

    Reads every routing pass through the layer's dispatch observer (``MoELayer.register_dispatch_observer``), before
    any expert-parallel all-to-all, and rebuilds the one-rank view of the calibration batch: under tensor parallelism
    the layer routes its sequence slice (or, with expert tensor parallelism, all slices in rank order), so the tokens
    are gathered over the tensor-parallel ranks and put back in sequence order; the rows of each expert then come from a
    :class:`LocalDispatcher` with the layer's capacity rules. The gate/up weights are gathered whole per pass.
    """

    def __init__(self, model: nn.Module, experts: list[tuple[str, LoRAExperts]]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.layers: dict[str, tuple[nn.Module, LoRAExperts]] = {}
        self.shape: dict[str, tuple[int, int, Any]] = {}
        self.handles = []
        for path, module in experts:
            layer_path = path.rpartition(".")[0]
            layer = model.get_submodule(layer_path) if layer_path else model
            self.layers[path] = (layer, module)
            self.handles.append(layer.register_dispatch_observer(functools.partial(self.observe, path)))
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(path)))

    def _layer_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            group = None
            if isinstance(x, DTensor) and x.device_mesh.size() > 1:
                group = x.device_mesh.get_group()
            self.shape[path] = (x.shape[0], x.shape[1], group)

        return hook

    @torch.no_grad()
    def observe(
        self, path: str, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> None:
        layer, experts = self.layers[path]
        B, S, group = self.shape[path]
        x, ids, weights = x_TD.detach(), topk_ids_TK.detach(), topk_weights_TK.detach()
        if group is not None:
            n = C.group_size(group)
            if not layer.expert_tensor_parallel:  # this rank's slice: gather the others
                x, ids, weights = (C.all_gather_no_grad(t, group) for t in (x, ids, weights))
            # [rank, B, S/n, ...] -> [B, S, ...]: the order of a one-rank forward
            x, ids, weights = (
                t.reshape(n, B, S // n, *t.shape[1:]).transpose(0, 1).reshape(B * S, *t.shape[1:])
                for t in (x, ids, weights)
            )
        E = experts.num_experts
        local = LocalDispatcher(E, layer.capacity_factor, layer.drop_policy)
        x_ND, tokens_per_expert_E, ctx = local.dispatch(x, ids, weights)
        sample_N = ctx.token_idx_N // S
        w_gate_up = _full(experts.gate_up_proj.detach()).flatten(1, 2).double()  # [E, 2I, H]
        sizes = tokens_per_expert_E.tolist()
        for name, d in zip(EXPERT_WEIGHTS, (experts.dim, experts.hidden)):
            self.sums.setdefault(f"{path}.{name}", torch.zeros(E, d, d, dtype=torch.float64, device=x.device))
            self.samples.setdefault(f"{path}.{name}", torch.zeros(E, dtype=torch.int64))
        for e, (rows, samples) in enumerate(zip(x_ND.double().split(sizes), sample_N.split(sizes))):
            if rows.shape[0] == 0:
                continue
            gate, up = (rows @ w_gate_up[e].T).chunk(2, dim=-1)
            for name, value in (("gate_up_proj", rows), ("down_proj", F.silu(gate) * up)):
                gram, present = _normalised_gram(value, samples, B)
                self.sums[f"{path}.{name}"][e] += gram
                self.samples[f"{path}.{name}"][e] += present

    def covariances(self) -> dict[str, list[torch.Tensor | None]]:
        """``{<experts path>.<weight>: [C_e or None]}``; ``None`` for an expert no calibration row reached."""
        out: dict[str, list[torch.Tensor | None]] = {}
        for key, sums in self.sums.items():
            counts = self.samples[key]
            out[key] = [s / int(c) if int(c) > 0 else None for s, c in zip(sums, counts)]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect_covariances(
    model: nn.Module, batches: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor | None]]]:
    """Run ``model`` on every ``input_ids`` batch; returns each adapted linear's covariance ``C`` and each adapted
    expert weight's per-expert covariances (``None`` where no row reached the expert), all fp64."""
    linears = CovarianceCollector(corda_modules(model))
    experts = ExpertCovarianceCollector(model, corda_experts(model))
    was_training = model.training
    device = next(iter(model.parameters())).device
    model.eval()
    try:
        for ids in batches:
            model(ids.to(device))
    finally:
        linears.remove()
        experts.remove()
        model.train(was_training)
    return linears.covariances(), experts.covariances()


@torch.no_grad()
def _write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` (plain, or a DTensor shard of it) to the whole tensor ``value`` (the same on every rank)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(
            value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)


def _identity_covariance(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64, device=device)


@torch.no_grad()
def calibrate_and_init(model: nn.Module, batches: list[torch.Tensor], cfg: CorDAConfig) -> dict[str, float]:
    """Collect the covariances over ``batches``, decompose every adapted weight (every expert of an adapted
    experts module) and set ``B = B₀``, ``A = A₀`` and the base to ``W − s·B₀A₀``. Returns the damping ``d`` per
    module path (for experts the largest over the experts of ``<path>.<weight>``)."""
    covariances, expert_covariances = collect_covariances(model, batches)
    damping: dict[str, float] = {}
    for path, m in corda_modules(model):
        if path not in covariances:
            raise PluginError(f"corda: module {path} received no input during calibration")
        W = _full(m.weight)
        dec = decompose(W, covariances[path].to(W.device))
        B0, A0 = corda_factors(dec, m.lora.r, cfg.mode, m.lora.scaling)
        residual = W.double() - m.lora.scaling * (B0 @ A0)
        _write_full(m.weight, residual.to(W.dtype))
        _write_full(m.lora.lora_A, A0.to(m.lora.lora_A.dtype))
        _write_full(m.lora.lora_B, B0.to(m.lora.lora_B.dtype))
        _write_full(m.lora_A0, A0)
        _write_full(m.lora_B0, B0)
        damping[path] = dec.damping
    for path, experts in corda_experts(model):
        for name, lora in experts.adapters().items():
            key = f"{path}.{name}"
            param = getattr(experts, name)
            W = _full(param)
            W_EOI = W.flatten(1, 2) if name == "gate_up_proj" else W  # [E, out, in]
            per_expert = expert_covariances.get(key, [None] * experts.num_experts)
            factors = []
            worst = DAMP_START
            unseen = []
            for e in range(experts.num_experts):
                C_e = per_expert[e]
                if C_e is None or not torch.diagonal(C_e).mean() > 0:  # no calibration row: a plain SVD
                    C_e = _identity_covariance(W_EOI.shape[-1], W.device)
                    unseen.append(e)
                dec = decompose(W_EOI[e], C_e.to(W.device))
                factors.append(corda_factors(dec, lora.r, cfg.mode, lora.scaling))
                worst = max(worst, dec.damping)
            B0 = torch.stack([b for b, _ in factors])
            A0 = torch.stack([a for _, a in factors])
            residual = W_EOI.double() - lora.scaling * (B0 @ A0)
            _write_full(param, residual.reshape(W.shape).to(W.dtype))
            _write_full(lora.lora_A, A0.to(lora.lora_A.dtype))
            _write_full(lora.lora_B, B0.to(lora.lora_B.dtype))
            _write_full(lora.lora_A0, A0)
            _write_full(lora.lora_B0, B0)
            damping[key] = worst
            if unseen:
                console.info(
                    f"corda: experts {unseen} of {key} received no calibration token: decomposed with C = I "
                    "(a plain SVD)"
                )
    return damping


def calibration_batches(config: JobConfig) -> list[torch.Tensor]:
    """The calibration ``input_ids`` batches: the first ``calibration_samples`` sequences (``calibration_seq_len``
    tokens) of ``corda.calibration_paths`` or of the job's ``data`` section, drawn with ``corda.seed``."""
    from framework.data.pretrain import build_pretrain_datasets, load_tokenizer, split_inputs_labels

    cfg: CorDAConfig = getattr(config, SECTION)
    data_cfg = config.data
    if cfg.calibration_paths:
        data_cfg = dataclasses.replace(data_cfg, paths=list(cfg.calibration_paths), weights=[])
    data_cfg = dataclasses.replace(data_cfg, val_fraction=0.0)
    seq_len = cfg.calibration_seq_len or config.data.seq_len
    tokenizer = load_tokenizer(data_cfg, progress=False)
    train, _ = build_pretrain_datasets(data_cfg, seq_len, cfg.seed, cfg.calibration_samples, 0, tokenizer)
    ids = torch.stack([split_inputs_labels(train[i])[0] for i in range(cfg.calibration_samples)])
    return list(ids.split(cfg.calibration_batch_size))


# --- export -------------------------------------------------------------------------------------------------------


def _stacked(
    lora: LoRALinear | ExpertsLoRA, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([A; A₀], [B | −B₀])`` of one adapter (per expert when stacked: ``[E, 2r, in]``, ``[E, out, 2r]``)."""
    A, B = _full(lora.lora_A).detach().float(), _full(lora.lora_B).detach().float()
    return torch.cat([A, _full(A0).float()], dim=-2), torch.cat([B, -_full(B0).float()], dim=-1)


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as a rank-``2r`` peft LoRA on the ORIGINAL base: ``lora_B = [B | −B₀]``, ``lora_A = [A; A₀]``
    (with alpha doubled, ``2α/2r = α/r``, this is ``s·(BA − B₀A₀)``); routed experts in peft's
    ``target_parameters`` layout (``lora_A [E·2r, in]``, ``lora_B [out, 2r·E]``, one wrapper level per weight)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        hf = hf_module_path(path)
        A, B = _stacked(m.lora, m.lora_A0, m.lora_B0)
        tensors[peft_key(hf, "lora_A")], tensors[peft_key(hf, "lora_B")] = A, B
    for path, experts in corda_experts(model):
        adapters = experts.adapters()
        for name, wrapper in peft_param_wrapper_paths(hf_module_path(path), list(adapters)).items():
            lora = adapters[name]
            A, B = experts_to_peft(*_stacked(lora, lora.lora_A0, lora.lora_B0))
            tensors[peft_key(wrapper, "lora_A")], tensors[peft_key(wrapper, "lora_B")] = A, B
    return tensors


def peft_adapter_config(model: nn.Module, config: JobConfig) -> dict[str, Any]:
    """``adapter_config.json`` of :func:`peft_tensors`: a plain peft LoRA of rank ``2r`` and alpha ``2α`` on the
    adapted modules (exact transformers paths) and expert weights (``target_parameters``), with the modules trained
    in full in ``modules_to_save`` (:func:`plugins.peft.modules_to_save.peft_fields`)."""
    cfg: CorDAConfig = getattr(config, SECTION)
    target_parameters = {
        f"{'.'.join(hf_module_path(p).split('.')[-2:])}.{name}"  # mlp.experts.<weight>
        for p, m in corda_experts(model)
        for name in m.adapters()
    }
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.model.init_from or None,
        "r": 2 * cfg.r,
        "lora_alpha": 2 * cfg.alpha,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": sorted(hf_module_path(p) for p, _ in corda_modules(model)),
        "target_parameters": sorted(target_parameters) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        **peft_fields(model, resolve(model, cfg.modules_to_save, SECTION)),
        "use_dora": False,
        "inference_mode": True,
    }


def write_corda(model: nn.Module, config: JobConfig, output_dir: Path) -> list[str]:
    """``expertrain export corda``: ``corda_adapter.safetensors`` (per module ``<path>.lora_A`` / ``lora_B`` (the
    trained adapter on the residual base) and ``lora_A0`` / ``lora_B0`` (its initial value); per adapted expert
    weight ``<experts path>.lora_<weight>.lora_A`` ... stacked over the experts; the modules trained in full
    (``corda.modules_to_save``) under their model names, ``output.weight``) and ``corda_config.json`` (mode, r,
    alpha, scale, module paths, ``modules_to_save``)."""
    cfg: CorDAConfig = getattr(config, SECTION)
    tensors: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = m.lora.lora_A, m.lora.lora_B
    for path, experts in corda_experts(model):
        for name, lora in experts.adapters().items():
            tensors[f"{path}.lora_{name}.lora_A"] = lora.lora_A
            tensors[f"{path}.lora_{name}.lora_B"] = lora.lora_B
    tensors.update(initial_factors(model))
    tensors = {k: _full(t).detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    saved = resolve(model, cfg.modules_to_save, SECTION)
    tensors.update(native_tensors(model, saved))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "corda_adapter.safetensors"), metadata={"format": "expertrain-corda"})
    meta = {
        "method": "corda",
        "mode": cfg.mode,
        "r": cfg.r,
        "alpha": cfg.alpha,
        "scaling": cfg.alpha / cfg.r,
        "modules": [p for p, _ in corda_modules(model)],
        "experts": [f"{p}.{name}" for p, m in corda_experts(model) for name in m.adapters()],
        "base_model": config.model.init_from or None,
        "delta": "scaling * (lora_B @ lora_A - lora_B0 @ lora_A0) on the original base (per expert for experts)",
        **format_fields(model, saved, naming="ours"),
    }
    (out / "corda_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["corda_adapter.safetensors", "corda_config.json"]


@torch.no_grad()
def merge_corda(model: nn.Module) -> list[str]:
    """Fold ``s·B·A`` into every residual base: a plain ``nn.Linear`` goes back in place of each adapted linear, and
    adapted experts drop their adapters."""
    merged = []
    for path, m in corda_modules(model):
        m.merge()
        restore_plain_linear(model, path, m)
        merged.append(path)
    for path, experts in corda_experts(model):
        experts.merge()
        experts.lora_gate_up_proj = None
        experts.lora_down_proj = None
        experts.merged = False  # nothing left to add or subtract
        merged.append(path)
    return merged


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: CorDAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: CorDAConfig = getattr(config, SECTION)
    if not cfg.target_experts:
        check_target_spec(SECTION, cfg.targets)
    if cfg.target_experts and config.train.engine == "deepspeed" and config.parallel.ep > 1:
        raise ConfigError(
            f"{SECTION}.target_experts",
            True,
            "expected false with train.engine=deepspeed and parallel.ep > 1 (DeepSpeed keeps plain expert slices, "
            "which the per-expert decomposition cannot gather whole); use train.engine=native or parallel.ep=1",
        )
    seq_len = cfg.calibration_seq_len or config.data.seq_len
    if seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"{SECTION}.calibration_seq_len",
            seq_len,
            f"expected at most model.max_seq_len={config.model.max_seq_len}",
        )
    tp = config.parallel.tp
    if tp > 1 and seq_len % tp and (config.parallel.sequence_parallel or config.moe.num_experts > 0):
        raise ConfigError(
            f"{SECTION}.calibration_seq_len",
            seq_len,
            f"expected a multiple of parallel.tp={tp} (the calibration forward splits the sequence over the "
            "tensor-parallel ranks like training does)",
        )


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: CorDAConfig = getattr(config, SECTION)
    targets = apply_corda(model, cfg)
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in adapter_parameter_names(model))
    detail = f"mode={cfg.mode}, r={cfg.r}, alpha={cfg.alpha:g}, {cfg.calibration_samples} calibration samples"
    saved, count = coverage_detail(model, resolve(model, cfg.modules_to_save, SECTION))
    if saved:
        detail += f"; {saved}"
    console.info(format_coverage(SECTION, model, targets, trainable + count, detail))


@hookimpl
def expertrain_init_weights(model: nn.Module) -> None:
    zero_adapters(model)


@hookimpl
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str]:
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    return adapter_parameter_names(model) + trainable_names(saved)


@hookimpl
def expertrain_after_parallelize(model: nn.Module, config: JobConfig, resumed: bool) -> None:
    if resumed:
        return  # the checkpoint holds the residual bases, the adapters and B₀ / A₀
    damping = calibrate_and_init(model, calibration_batches(config), getattr(config, SECTION))
    worst = max(damping.values(), default=DAMP_START)
    experts = corda_experts(model)
    what = f"{len(corda_modules(model))} modules"
    if experts:
        n = sum(m.num_experts * len(m.adapters()) for _, m in experts)
        what += f" and {n} expert weights ({len(experts)} MoE layers)"
    console.info(f"corda: decomposed {what}; largest damping d = {worst:g}")


@hookimpl
def expertrain_state_dict(model: nn.Module) -> dict[str, Any] | None:
    return initial_factors(model) or None


@hookimpl
def expertrain_load_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    buffers = initial_factors(model)
    if set(state) != set(buffers):
        raise PluginError(
            "corda: the checkpoint's adapted modules differ from this job's (corda.targets, corda.target_experts "
            "or the model changed); restore them or start a new run directory"
        )
    with torch.no_grad():
        for key, value in state.items():
            buffers[key].copy_(value)


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format == CORDA_FORMAT:
        return write_corda(model, config, output_dir)
    if export_format != PEFT_FORMAT:
        return None
    if "lora" in config.plugins:
        raise PluginError(
            "corda: `expertrain export peft` of a job with both 'lora' and 'corda' would write two adapters to one "
            "file; export 'corda' (and the lora adapters separately) instead"
        )
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    tensors = {**peft_tensors(model), **saved_peft_tensors(model, saved)}
    return write_adapter(output_dir, tensors, peft_adapter_config(model, config))


@hookimpl
def expertrain_merge_adapters(model: nn.Module) -> list[str] | None:
    return merge_corda(model) or None


@hookimpl
def expertrain_merge_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The streamed ``export hf --merge``: ``W_res + s·B·A`` on base tensor ``name`` (what :func:`merge_corda`
    gives it)."""
    return merge_into_tensor(model, SECTION, name, tensor)


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    summary["lines"].append(
        f"corda           {len(corda_modules(model)) + len(corda_experts(model))} adapted modules; export on the original base with "
        f"`expertrain export {PEFT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>`"
    )


__all__ = [
    "CorDAConfig",
    "CorDAExpertsLoRA",
    "CorDALinear",
    "CovarianceCollector",
    "Decomposition",
    "adapter_parameter_names",
    "apply_corda",
    "calibrate_and_init",
    "calibration_batches",
    "collect_covariances",
    "ExpertCovarianceCollector",
    "corda_experts",
    "corda_factors",
    "corda_modules",
    "damped_inverse",
    "decompose",
    "initial_factors",
    "merge_corda",
    "peft_adapter_config",
    "peft_tensors",
    "write_corda",
]
