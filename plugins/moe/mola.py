"""MoLA: MoE-LoRA with layer-wise expert allocation (Gao et al., arXiv 2402.08562). Plugin ``mola``.

Every targeted projection ``W`` of layer ``l`` (attention ``q/k/v/o_proj``, dense MLP ``gate/up/down_proj``, and
the ``nn.Linear`` projections of the MoE layers' shared experts; never the fused routed experts) becomes a
:class:`MoLALinear`: a router ``Linear(in, N_l)`` in fp32 and ``N_l`` LoRA experts ``(A_i [r, in], B_i [out, r])``::

    p = softmax(router(x))                      (fp32)
    w = top-k of p, renormalised to sum to 1
    y = W x + Σ_{i ∈ top-k} w_i · B_i A_i dropout(x) · α/r

The base model is frozen: only routers and experts train. ``N_l`` comes from ``mola.experts`` (one count per layer)
or from ``mola.allocation``, a shape over 4 contiguous groups of layers scaled so the largest group has
``mola.base_experts`` (8-6-4-2, 2-4-6-8, … for the default 8; :func:`expert_allocation`).

Compute: the experts of one projection are evaluated together as two matmuls over all ``N_l·r`` adapter rows, with
the unselected experts' gates set to exactly 0 (:meth:`MoLALinear.forward`). That is the same result, values and
gradients, as computing only the top-k experts, and the extra work is the adapter's ``N_l/k`` times, tiny next to
``W x`` because ``r`` is small.

Hooks: config section ``mola``; validation (every rank); the model transform with a coverage line on rank 0; the
trainable set; a Switch balance loss ``mola_balance`` (off by default, as in the reference); routing metrics
``mola/layer<l>.<proj>/tokens_e<j>`` (exact counts since the last metrics call, summed over all ranks) and
``mola/max_over_mean``; ``expertrain export mola`` (``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.comm import collectives as C
from framework.config import ConfigError, JobConfig, option
from framework.hooks import PluginError, hookimpl
from framework.models.init import InitSource, KeyedInit
from framework.models.moe import expert_counts
from framework.models.recompute import in_backward
from framework.observe import console
from plugins.peft.low_rank import (
    PEFT_PREFIX,
    LoRAInit,
    experts_to_peft,
    init_lora_,
    linear_init_,
    lora_scaling,
    peft_key,
    write_adapter,
)
from plugins.peft.modules_to_save import (
    coverage_detail,
    format_fields,
    modules_to_save_option,
    native_tensors,
    resolve,
    trainable_names,
)
from plugins.peft.targets import claim

SECTION = "mola"
EXPORT_FORMAT = "mola"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Allocation = Literal["uniform", "triangle", "inverted_triangle", "hourglass"]
ALLOCATION_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "uniform": (4, 4, 4, 4),  # MoLA-□
    "triangle": (4, 3, 2, 1),  # MoLA-△: 8-6-4-2
    "inverted_triangle": (1, 2, 3, 4),  # MoLA-▽: 2-4-6-8, the paper's best
    "hourglass": (4, 1, 1, 4),  # MoLA-⊳⊲: 8-2-2-8
}
"""Experts of each quarter of the layers (bottom to top), in units of ``base_experts / 4``."""


@dataclass
class MoLAConfig:
    """MoE-LoRA with layer-wise expert allocation (arXiv 2402.08562)."""

    targets: list[str] = option(
        default_factory=lambda: list(PROJECTIONS),
        doc="Projections to adapt, by name: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj "
        "(dense MLP and shared-expert projections; fused routed experts are never adapted).",
    )
    experts: list[int] = option(
        default_factory=list,
        doc="LoRA experts per layer, one count per layer (model.n_layers of them); empty = from allocation.",
    )
    allocation: Allocation = option(
        "inverted_triangle",
        doc="Experts per group of layers when 'experts' is empty: 4 contiguous groups, bottom to top, "
        "uniform 8-8-8-8, triangle 8-6-4-2, inverted_triangle 2-4-6-8, hourglass 8-2-2-8 (for base_experts 8).",
    )
    base_experts: int = option(8, doc="Experts of the largest group of an allocation.", min=1)
    top_k: int = option(2, doc="LoRA experts each token uses per projection.", min=1)
    r: int = option(8, doc="Rank of every LoRA expert.", min=1)
    alpha: float = option(
        16.0, doc="LoRA alpha: the delta is scaled by alpha / r.", min=0.0, min_exclusive=True
    )
    rslora: bool = option(False, doc="Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.")
    dropout: float = option(0.05, doc="Dropout on the adapter input (not on the base path); < 1.", min=0.0)
    init: LoRAInit = option(
        "kaiming", doc="Init of every A: kaiming (uniform, bound 1/sqrt(in)) or gaussian (std 1/r); B = 0."
    )
    aux_loss_coef: float = option(
        0.0,
        doc="Switch balance loss weight, summed over layers (mean over a layer's projections); 0 = off. "
        "The reference uses 1e-3 when it is on.",
        min=0.0,
    )
    modules_to_save: list[str] = modules_to_save_option()


# --- expert allocation --------------------------------------------------------------------------------------------


def layer_groups(n_layers: int) -> list[int]:
    """The group (0-3, bottom to top) of every layer: 4 contiguous groups as even as possible, the lower groups
    one layer larger when ``n_layers`` is not a multiple of 4 (fewer than 4 layers use the lowest groups only)."""
    q, rem = divmod(n_layers, 4)
    sizes = [q + (1 if g < rem else 0) for g in range(4)]
    return [g for g, size in enumerate(sizes) for _ in range(size)]


def expert_allocation(allocation: str, base_experts: int, n_layers: int) -> list[int]:
    """Experts per layer for a named allocation: ``base_experts · shape / 4`` rounded half up, at least 1.

    ``expert_allocation("triangle", 8, 32)`` is the paper's 8-6-4-2 (eight layers of 8 experts, then 6, 4, 2)."""
    shape = ALLOCATION_SHAPES[allocation]
    per_group = [max(1, math.floor(base_experts * s / 4 + 0.5)) for s in shape]
    return [per_group[g] for g in layer_groups(n_layers)]


def resolve_experts(cfg: MoLAConfig, n_layers: int) -> list[int]:
    """``cfg.experts`` if given, else the allocation's counts."""
    return list(cfg.experts) if cfg.experts else expert_allocation(cfg.allocation, cfg.base_experts, n_layers)


# --- the adapted projection ---------------------------------------------------------------------------------------


def switch_balance_loss(probs_TN: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss ``N · Σ_i f_i · P_i``: ``f_i`` the share of the ``T·k`` routing slots that
    chose expert ``i``, ``P_i`` the mean router probability of ``i``. 1 at perfect balance."""
    N = probs_TN.shape[-1]
    f_N = expert_counts(ids_TK, N).to(probs_TN.dtype) / ids_TK.numel()
    return N * (f_N * probs_TN.mean(dim=0)).sum()


class MoLALinear(nn.Linear):
    """An ``nn.Linear`` with a router and ``num_experts`` LoRA experts (see the module docstring for the math).

    Takes over the base layer's ``weight`` (and ``bias``) Parameter objects, so their names in the model are
    unchanged; adds ``router.weight [N, in]`` (fp32), ``lora_A [N, r, in]`` and ``lora_B [N, out, r]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        top_k: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        layer_id: int = 0,
        proj: str = "",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's, not a new one
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.scaling = lora_scaling(r, alpha, rslora)
        self.layer_id, self.proj = layer_id, proj
        """Where the projection sits, for metric names: ``mola/layer<layer_id>.<proj>/...``."""
        device, dtype = base.weight.device, base.weight.dtype
        self.router = nn.Linear(self.in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(num_experts, r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.track_balance = False
        """Keep each training forward's Switch balance loss for :meth:`pop_balance_loss` (set by the plugin)."""
        # Plain attributes, not buffers: never saved, never broadcast (each rank counts its own tokens).
        self._counts_N: torch.Tensor | None = None
        self._balance: torch.Tensor | None = None

    def reset_adapters(self, init: LoRAInit = "kaiming", generator: InitSource = None) -> None:
        """Router Kaiming-uniform (the ``nn.Linear`` default, as in the reference), every ``A`` per ``init``,
        every ``B = 0`` (so the layer starts as the base layer)."""
        linear_init_(self.router.weight, generator)
        init_lora_(self.lora_A, self.lora_B, init, generator)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 routing of ``T`` tokens: ``(gates_TN, ids_TK, probs_TN)``; ``gates`` holds the renormalised top-k
        weights at the chosen experts and exactly 0 elsewhere."""
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TN = F.linear(x_TD.float(), self.router.weight.float())
        probs_TN = logits_TN.softmax(dim=-1)
        top_TK, ids_TK = probs_TN.topk(self.top_k, dim=-1)
        top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        gates_TN = torch.zeros_like(probs_TN).scatter(1, ids_TK, top_TK)
        return gates_TN, ids_TK, probs_TN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        x_TD = x.reshape(-1, self.in_features)
        gates_TN, ids_TK, probs_TN = self.route(x_TD)
        if self.training and not in_backward():
            self._record(ids_TK, probs_TN)
        # All experts at once: h = A·dropout(x) for every expert [T, N, r], gated (0 for unselected experts), then
        # one contraction over (expert, rank) with B.
        T, N, R = x_TD.shape[0], self.num_experts, self.r
        h_TNR = F.linear(self.lora_dropout(x_TD), self.lora_A.reshape(N * R, self.in_features)).view(T, N, R)
        h_TM = (h_TNR * gates_TN.unsqueeze(-1).to(h_TNR.dtype)).reshape(T, N * R)  # M = (expert, rank) rows
        delta_TO = h_TM @ self.lora_B.transpose(1, 2).reshape(N * R, self.out_features)
        return y + (self.scaling * delta_TO).view(*x.shape[:-1], self.out_features).to(y.dtype)

    def _record(self, ids_TK: torch.Tensor, probs_TN: torch.Tensor) -> None:
        counts_N = expert_counts(ids_TK, self.num_experts)  # fixed shape: no graph break under torch.compile
        self._counts_N = counts_N if self._counts_N is None else self._counts_N + counts_N
        if self.track_balance:
            self._balance = switch_balance_loss(probs_TN, ids_TK)

    def consume_counts(self) -> torch.Tensor:
        """Exact int64 tokens routed to each expert by training forwards since the last call ``[N]``; then zeroes."""
        counts = self._counts_N
        self._counts_N = None
        if counts is None:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=self.weight.device)
        return counts

    def pop_balance_loss(self) -> torch.Tensor | None:
        """The last training forward's Switch balance loss (unweighted), then forgets it; ``None`` if none."""
        loss, self._balance = self._balance, None
        return loss

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"experts={self.num_experts}, top_k={self.top_k}, r={self.r}, scaling={self.scaling:g}"
        )


def mola_modules(model: nn.Module) -> list[tuple[str, MoLALinear]]:
    """``(module path, module)`` of every MoLA projection, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoLALinear)]


def _metric_prefix(module: MoLALinear) -> str:
    return f"mola/layer{module.layer_id}.{module.proj}"


# --- the model transform --------------------------------------------------------------------------------------------


def _adapter_seed(config: JobConfig) -> int:
    # Offset from the model's own seed so adapters do not replay the base weights' random stream.
    return (config.train.seed * 1_000_003 + 0x4D6F4C41) % (1 << 63)


def apply_mola(model: nn.Module, cfg: MoLAConfig, seed: int) -> list[str]:
    """Replace every targeted ``nn.Linear`` inside ``model.layers`` by a :class:`MoLALinear` (in place). Returns the
    adapted module paths (empty if nothing matched). On real weights the adapters are initialised at once from
    ``seed``; on the meta device by :func:`init_adapters` once they exist."""
    counts = resolve_experts(cfg, len(model.layers))
    targets = set(cfg.targets)
    adapted: list[str] = []
    for layer_id, block in enumerate(model.layers):
        found = [
            (path, m)
            for path, m in block.named_modules()
            if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in targets
        ]
        # Metric names use the projection name alone unless a block has two projections of that name.
        leaf_uses = Counter(path.rsplit(".", 1)[-1] for path, _ in found)
        for path, base in found:
            # Another adapter plugin on the same module is an error naming both.
            claim(base, SECTION, f"layers.{layer_id}.{path}")
            parent_path, _, leaf = path.rpartition(".")
            module = MoLALinear(
                base,
                counts[layer_id],
                cfg.top_k,
                cfg.r,
                cfg.alpha,
                cfg.dropout,
                cfg.rslora,
                layer_id=layer_id,
                proj=leaf if leaf_uses[leaf] == 1 else path,
            )
            module.track_balance = cfg.aux_loss_coef > 0
            claim(module, SECTION, f"layers.{layer_id}.{path}")
            setattr(block.get_submodule(parent_path) if parent_path else block, leaf, module)
            adapted.append(f"layers.{layer_id}.{path}")
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, cfg, seed)
    return adapted


def init_adapters(model: nn.Module, cfg: MoLAConfig, seed: int) -> None:
    """Every router Kaiming-uniform, ``A`` per ``cfg.init``, ``B = 0``, keyed by ``seed`` and the parameter's name:
    the same values on every rank and layout."""
    init = KeyedInit(seed, model.named_parameters())
    for _, module in mola_modules(model):
        module.reset_adapters(cfg.init, init)


def _coverage_line(model: nn.Module, cfg: MoLAConfig, adapted: list[str], experts: list[int]) -> str:
    modules = mola_modules(model)
    trainable = sum(p.numel() for _, m in modules for p in (m.router.weight, m.lora_A, m.lora_B))
    saved, count = coverage_detail(model, resolve(model, cfg.modules_to_save, SECTION))
    trainable += count
    total = sum(p.numel() for p in model.parameters())
    by_proj = Counter(path.rsplit(".", 1)[-1] for path in adapted)
    layers = sorted({m.layer_id for _, m in modules})
    where = ", ".join(f"{name} x{n}" for name, n in by_proj.items())
    return (
        f"mola: adapted {len(adapted)} projections in {len(layers)} of {len(experts)} layers ({where}); "
        f"experts per layer {experts}, top-{cfg.top_k}, r={cfg.r}, alpha={cfg.alpha:g}; "
        f"{f'{saved}; ' if saved else ''}"
        f"{trainable:,} trainable parameters = {100 * trainable / max(total, 1):.2f}% of {total:,}"
    )


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: MoLAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: MoLAConfig = getattr(config, SECTION)
    n_layers = config.model.n_layers
    if config.parallel.tp > 1:
        raise ConfigError(
            "parallel.tp",
            config.parallel.tp,
            "expected 1 with plugin 'mola' (its adapters are not tensor-parallel); use data and expert "
            "parallelism (parallel.data, parallel.ep) instead",
        )
    if not cfg.targets:
        raise ConfigError("mola.targets", cfg.targets, f"expected at least one of {', '.join(PROJECTIONS)}")
    for i, target in enumerate(cfg.targets):
        if target not in PROJECTIONS:
            raise ConfigError(f"mola.targets[{i}]", target, f"expected one of {', '.join(PROJECTIONS)}")
    if len(set(cfg.targets)) != len(cfg.targets):
        raise ConfigError("mola.targets", cfg.targets, "expected each projection named once")
    if cfg.dropout >= 1:
        raise ConfigError("mola.dropout", cfg.dropout, "expected a number >= 0 and < 1")
    if cfg.experts:
        if len(cfg.experts) != n_layers:
            raise ConfigError(
                "mola.experts",
                cfg.experts,
                f"expected {n_layers} counts, one per layer (model.n_layers={n_layers}), or an empty list to use "
                "mola.allocation",
            )
        for i, n in enumerate(cfg.experts):
            if n < 1:
                raise ConfigError(f"mola.experts[{i}]", n, "expected at least 1 expert per layer")
    counts = resolve_experts(cfg, n_layers)
    for layer_id, n in enumerate(counts):
        if cfg.top_k > n:
            source = (
                "mola.experts"
                if cfg.experts
                else f"allocation {cfg.allocation} with base_experts {cfg.base_experts}: {counts}"
            )
            raise ConfigError(
                "mola.top_k",
                cfg.top_k,
                f"expected at most {n}: layer {layer_id} has {n} experts ({source}); lower mola.top_k or give "
                "that layer more experts",
            )


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: MoLAConfig = getattr(config, SECTION)
    adapted = apply_mola(model, cfg, _adapter_seed(config))
    if not adapted:
        raise ConfigError(
            "mola.targets",
            cfg.targets,
            "expected names that match nn.Linear projections of the model; none matched (routed experts of MoE "
            "layers are fused weights, not projections: gate_proj/up_proj/down_proj only match dense MLP layers "
            "and shared experts)",
        )
    matched = {path.rsplit(".", 1)[-1] for path in adapted}
    unmatched = [t for t in cfg.targets if t not in matched]
    if unmatched:
        console.warn(
            f"mola: target(s) {', '.join(unmatched)} match no projection of this model (MoE layers without "
            "shared experts have no gate/up/down_proj modules); they are not adapted"
        )
    console.info(_coverage_line(model, cfg, adapted, resolve_experts(cfg, len(model.layers))))


@hookimpl
def expertrain_init_weights(model: nn.Module, config: JobConfig) -> None:
    init_adapters(model, getattr(config, SECTION), _adapter_seed(config))


@hookimpl
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str]:
    adapters = [
        f"{path}.{name}"
        for path, module in mola_modules(model)
        for name in ("router.weight", "lora_A", "lora_B")
    ]
    return adapters + trainable_names(resolve(model, getattr(config, SECTION).modules_to_save, SECTION))


@hookimpl
def expertrain_extra_losses(model: nn.Module, config: JobConfig) -> dict[str, torch.Tensor] | None:
    coef = getattr(config, SECTION).aux_loss_coef
    if coef == 0:
        return None
    per_layer: dict[int, list[torch.Tensor]] = {}
    for _, module in mola_modules(model):
        loss = module.pop_balance_loss()
        if loss is not None:
            per_layer.setdefault(module.layer_id, []).append(loss)
    if not per_layer:
        return None
    total = sum(torch.stack(losses).mean() for losses in per_layer.values())
    return {"mola_balance": coef * total}


@hookimpl
def expertrain_metrics(model: nn.Module) -> dict[str, float] | None:
    modules = [m for _, m in mola_modules(model)]
    if not modules:
        return None
    # One all-reduce for every projection; on the model's device so that NCCL can carry it.
    per_module = [m.consume_counts() for m in modules]
    flat = torch.cat(per_module)
    C.all_reduce_sum(flat)
    out: dict[str, float] = {}
    ratios: list[float] = []
    for module, counts_N in zip(modules, flat.cpu().split([c.numel() for c in per_module])):
        prefix = _metric_prefix(module)
        for j, v in enumerate(counts_N.tolist()):
            out[f"{prefix}/tokens_e{j}"] = v
        mean = counts_N.double().mean().item()
        if mean > 0:
            ratios.append(counts_N.max().item() / mean)
    if ratios:
        out["mola/max_over_mean"] = max(ratios)
        out["mola/mean_max_over_mean"] = sum(ratios) / len(ratios)
    return out


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The MoLA tensors of ``model`` in the export naming: per projection at module path ``p``,
    ``base_model.model.<p>.router.weight [N, in]``, ``...lora_A.weight [N·r, in]`` and ``...lora_B.weight [out, r·N]``
    (peft's layout for experts flattened into the rank: :func:`plugins.peft.low_rank.experts_to_peft`)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, module in mola_modules(model):
        lora_A, lora_B = experts_to_peft(module.lora_A.detach(), module.lora_B.detach())
        tensors[peft_key(path, "router")] = module.router.weight.detach()
        tensors[peft_key(path, "lora_A")] = lora_A
        tensors[peft_key(path, "lora_B")] = lora_B
    return tensors


def adapter_config(model: nn.Module, config: JobConfig) -> dict[str, Any]:
    """What ``adapter_config.json`` holds: the MoLA settings, every adapted module and the base model."""
    cfg: MoLAConfig = getattr(config, SECTION)
    return {
        "adapter_type": "mola",
        "paper": "arXiv:2402.08562",
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
        "top_k": cfg.top_k,
        "target_modules": list(cfg.targets),
        "experts_per_layer": resolve_experts(cfg, config.model.n_layers),
        "allocation": "custom" if cfg.experts else cfg.allocation,
        **format_fields(model, resolve(model, cfg.modules_to_save, SECTION), naming="ours"),
        "modules": {
            path: {
                "layer": m.layer_id,
                "num_experts": m.num_experts,
                "in_features": m.in_features,
                "out_features": m.out_features,
            }
            for path, m in mola_modules(model)
        },
        "tensor_layout": {
            "router.weight": "[num_experts, in_features], fp32; gates = top_k of softmax, renormalised",
            "lora_A.weight": "[num_experts * r, in_features]; rows e*r .. e*r+r-1 are expert e",
            "lora_B.weight": "[out_features, r * num_experts]; column j*num_experts + e is rank j of expert e",
            "delta": "sum over the top_k experts e of gate_e * scaling * B_e A_e x, scaling = lora_alpha / r",
            "base_model.model.<name>": "a module trained in full (modules_to_save): replaces the base's <name>",
        },
        "base_model": {
            "framework": "expertrain",
            "model": dataclasses.asdict(config.model),
            "moe": dataclasses.asdict(config.moe),
            "seed": config.train.seed,
        },
    }


@hookimpl
def expertrain_merge_adapters() -> list[str] | None:
    """MoLA's LoRA experts are routed per token, so their update depends on the input: nothing to merge."""
    raise PluginError(
        "mola: the LoRA experts are routed per token (the weight update depends on the input), so they cannot be "
        "merged into the base weights; export them with `expertrain export mola`"
    )


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format != EXPORT_FORMAT:
        return None
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    tensors = adapter_tensors(model)
    tensors.update({f"{PEFT_PREFIX}{name}": t for name, t in native_tensors(model, saved).items()})
    return write_adapter(output_dir, tensors, adapter_config(model, config))


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    n = len(mola_modules(model))
    summary["lines"].append(
        f"mola            {n} adapted projections; export the adapters with "
        f"`expertrain export mola --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>`"
    )
