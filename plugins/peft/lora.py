"""LoRA (Hu et al. 2021) on a frozen base. Plugin ``lora``; the math lives in :mod:`plugins.peft.low_rank`.

Every targeted ``nn.Linear`` ``W [out, in]`` becomes a :class:`~plugins.peft.low_rank.LoRALinear`::

    y = W x + s·B·A·dropout(x),   A [r, in], B [out, r],   s = alpha / r   (rsLoRA: alpha / sqrt(r))

and, with ``target_experts``, every routed-experts module a :class:`~plugins.peft.low_rank.LoRAExperts` with one
such delta per expert on the fused ``gate_up_proj`` (as ``[E, 2I, H]``) and ``down_proj`` (``[E, H, I]``).
Targets follow peft's ``target_modules`` (suffix list, regex, ``all-linear``; :mod:`plugins.peft.targets`), and
``rank_pattern`` / ``alpha_pattern`` give some modules (or expert weights, by parameter path such as
``layers.0.ffn.experts.down_proj``) their own rank or alpha. ``A`` starts Kaiming-uniform (or Gaussian ``N(0, 1/r)``),
``B`` at 0, so the model starts as the base; only the adapters train.

Parallelism: under tensor parallelism the adapters follow their base layer (column-parallel: ``B`` sharded on its
output rows, ``A`` replicated; row-parallel: ``A`` sharded on its input columns, ``B`` replicated); under expert
parallelism the expert adapters are cut with their experts. Export: ``expertrain export peft`` writes a peft
``adapter_model.safetensors`` + ``adapter_config.json`` with transformers module paths (docs/plugins/lora.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.models.init import KeyedInit
from framework.observe import console
from plugins.peft.low_rank import (
    DeferredTensor,
    ExpertsLoRA,
    LoRAExperts,
    LoRAInit,
    LoRALinear,
    deferred_experts_to_peft,
    experts_to_peft,
    hf_module_path,
    merge_into_tensor,
    peft_key,
    peft_param_wrapper_paths,
    write_adapter,
)
from plugins.peft.modules_to_save import (
    coverage_detail,
    modules_to_save_option,
    peft_fields,
    peft_tensors,
    resolve,
    trainable_names,
)
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    claim,
    format_coverage,
    owned_modules,
    pattern_value,
    restore_plain_linear,
    select_targets,
)

SECTION = "lora"
EXPORT_FORMAT = "peft"


@dataclass
class LoRAConfig:
    """LoRA adapters on a frozen base (Hu et al. 2021), peft-compatible."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to adapt: a list of module-name suffixes (q_proj, attention.o_proj, ...), a regular expression "
        "matched against whole module paths (layers.0.attention.q_proj), or 'all-linear' (every nn.Linear except the "
        "LM head; routers and shared experts of MoE blocks are never adapted).",
    )
    target_experts: bool = option(
        False,
        doc="Also adapt the fused routed-expert weights gate_up_proj and down_proj, one delta per expert.",
    )
    r: int = option(8, doc="Rank of every adapter (unless rank_pattern says otherwise).", min=1)
    alpha: float = option(
        16.0, doc="LoRA alpha: the delta is scaled by alpha / r.", min=0.0, min_exclusive=True
    )
    use_rslora: bool = option(
        False, doc="Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r."
    )
    rank_pattern: dict[str, int] = option(
        default_factory=dict,
        doc="Per-module ranks: {regex or suffix: r}, peft semantics (first key k with re.match('(.*\\.)?(k)$', "
        "path)); expert weights match by parameter path (layers.0.ffn.experts.down_proj).",
    )
    alpha_pattern: dict[str, float] = option(
        default_factory=dict, doc="Per-module alphas: {regex or suffix: alpha}, like rank_pattern."
    )
    dropout: float = option(
        0.0,
        doc="Dropout on the adapter input (not the base path); < 1; must be 0 with target_experts.",
        min=0.0,
    )
    init: LoRAInit = option(
        "kaiming",
        doc="Init of every A: kaiming (uniform, bound 1/sqrt(in), peft's default) or gaussian (std 1/r).",
    )
    seed: int = option(0, doc="Seed of the adapter init (the same adapters on every rank and layout).", min=0)
    modules_to_save: list[str] = modules_to_save_option()


def _check_patterns(cfg: LoRAConfig) -> None:
    for name, values, kind in (
        ("rank_pattern", cfg.rank_pattern, int),
        ("alpha_pattern", cfg.alpha_pattern, float),
    ):
        for pattern, value in values.items():
            key = f"{SECTION}.{name}.{pattern}"
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    key, pattern, f"expected a regular expression or a suffix ({exc})"
                ) from None
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (kind is int and not isinstance(value, int)) or value <= 0:
                what = "an integer rank >= 1" if kind is int else "a number > 0"
                raise ConfigError(key, value, f"expected {what}")


# --- the model transform ------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, cfg: LoRAConfig, plugin: str = SECTION) -> Targets:
    """Wrap every module ``cfg`` targets (in place). Returns the selected modules (the originals, by path); raises
    ``ConfigError`` if a target part matches nothing or a module is already adapted by another plugin.

    On a model with real weights the adapters are initialised at once (:func:`init_adapters`); on the meta device
    they get their values from :func:`init_adapters` once the (sharded) parameters exist."""
    targets = select_targets(model, cfg.targets, cfg.target_experts, section=SECTION)
    for path, base in targets.linears:
        claim(base, plugin, path)
        r = pattern_value(cfg.rank_pattern, path, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, path, cfg.alpha)
        module = LoRALinear(base, r, alpha, cfg.dropout, cfg.use_rslora)
        claim(module, plugin, path)
        model.set_submodule(path, module)
    for path, experts in targets.experts:
        claim(experts, plugin, path)
        E, H, hidden = experts.num_experts, experts.dim, experts.hidden
        w = experts.gate_up_proj
        adapters: dict[str, ExpertsLoRA] = {}
        for name, (d_in, d_out) in (("gate_up_proj", (H, 2 * hidden)), ("down_proj", (hidden, H))):
            r = pattern_value(cfg.rank_pattern, f"{path}.{name}", cfg.r)
            alpha = pattern_value(cfg.alpha_pattern, f"{path}.{name}", cfg.alpha)
            adapters[f"lora_{name}"] = ExpertsLoRA(
                E, d_in, d_out, r, alpha, 0.0, cfg.use_rslora, device=w.device, dtype=w.dtype
            )
        module = LoRAExperts(experts, **adapters)
        claim(module, plugin, path)
        model.set_submodule(path, module)
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, cfg, plugin)
    return targets


def init_adapters(model: nn.Module, cfg: LoRAConfig, plugin: str = SECTION) -> None:
    """``A`` per ``cfg.init`` and ``B = 0`` for every adapter of ``plugin``, keyed by ``cfg.seed`` and the
    parameter's name: the same values on every rank and layout, sharded or whole."""
    init = KeyedInit(cfg.seed, model.named_parameters())
    for _, m in lora_modules(model, plugin):
        deltas = [m.lora] if isinstance(m, LoRALinear) else list(m.adapters().values())
        for delta in deltas:
            delta.reset_parameters(cfg.init, init)


def lora_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, LoRALinear | LoRAExperts]]:
    """``(module path, module)`` of every module ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, (LoRALinear, LoRAExperts))


def adapter_parameter_names(model: nn.Module, plugin: str = SECTION) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every adapter tensor ``plugin`` added."""
    names: list[str] = []
    for path, m in lora_modules(model, plugin):
        local = ["lora.lora_A", "lora.lora_B"] if isinstance(m, LoRALinear) else m.per_expert_parameters()
        names += [f"{path}.{n}" for n in local]
    return names


def set_merged(model: nn.Module, merged: bool, plugin: str = SECTION) -> None:
    """Merge every adapter of ``plugin`` into its base weight (``W += s·B·A``), or unmerge it again."""
    for _, m in lora_modules(model, plugin):
        m.merge() if merged else m.unmerge()


# --- hooks --------------------------------------------------------------------------------------------------------


@hookimpl
def expertrain_config_sections() -> dict[str, type]:
    return {SECTION: LoRAConfig}


@hookimpl
def expertrain_validate_config(config: JobConfig) -> None:
    cfg: LoRAConfig = getattr(config, SECTION)
    if cfg.dropout >= 1:
        raise ConfigError(f"{SECTION}.dropout", cfg.dropout, "expected a number >= 0 and < 1")
    if cfg.target_experts and cfg.dropout > 0:
        raise ConfigError(
            f"{SECTION}.dropout",
            cfg.dropout,
            "expected 0 with lora.target_experts=true (expert deltas are added to the fused weights, which leaves "
            "no adapter-only input to drop, as in peft's target_parameters); set lora.dropout=0",
        )
    if isinstance(cfg.targets, list) and not cfg.targets and not cfg.target_experts:
        raise ConfigError(
            f"{SECTION}.targets",
            cfg.targets,
            f"expected module-name suffixes, a regular expression or '{ALL_LINEAR}'",
        )
    _check_patterns(cfg)


@hookimpl
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    cfg: LoRAConfig = getattr(config, SECTION)
    targets = apply_lora(model, cfg)
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in adapter_parameter_names(model))
    scale = "alpha/sqrt(r)" if cfg.use_rslora else "alpha/r"
    detail = f"r={cfg.r}, alpha={cfg.alpha:g} (scale {scale})"
    if cfg.rank_pattern or cfg.alpha_pattern:
        detail += f", rank_pattern={cfg.rank_pattern}, alpha_pattern={cfg.alpha_pattern}"
    saved, count = coverage_detail(model, resolve(model, cfg.modules_to_save, SECTION))
    if saved:
        detail += f"; {saved}"
    console.info(format_coverage(SECTION, model, targets, trainable + count, detail))


@hookimpl
def expertrain_init_weights(model: nn.Module, config: JobConfig) -> None:
    init_adapters(model, getattr(config, SECTION))


@hookimpl
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str]:
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    return adapter_parameter_names(model) + trainable_names(saved)


# --- export (peft format) -----------------------------------------------------------------------------------------


def adapter_tensors(
    model: nn.Module, plugin: str = SECTION, *, deferred: bool = False
) -> dict[str, torch.Tensor | DeferredTensor]:
    """The adapters in peft's ``adapter_model.safetensors`` naming with transformers module paths:
    ``base_model.model.<hf path>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``; routed experts in peft's
    ``target_parameters`` layout (``lora_A [E·r, in]``, ``lora_B [out, r·E]``), one wrapper level per weight.
    ``deferred``: the experts' ``lora_B`` (a permuted copy) made only when :func:`write_adapter` writes it."""
    to_peft = deferred_experts_to_peft if deferred else experts_to_peft
    tensors: dict[str, torch.Tensor | DeferredTensor] = {}
    for path, m in lora_modules(model, plugin):
        hf = hf_module_path(path)
        if isinstance(m, LoRALinear):
            tensors[peft_key(hf, "lora_A")] = m.lora.lora_A.detach()
            tensors[peft_key(hf, "lora_B")] = m.lora.lora_B.detach()
            continue
        adapters = m.adapters()
        for name, wrapper in peft_param_wrapper_paths(hf, list(adapters)).items():
            lora_A, lora_B = to_peft(adapters[name].lora_A.detach(), adapters[name].lora_B.detach())
            tensors[peft_key(wrapper, "lora_A")] = lora_A
            tensors[peft_key(wrapper, "lora_B")] = lora_B
    return tensors


def _hf_targets(cfg: LoRAConfig, model: nn.Module, plugin: str) -> list[str] | str:
    """``target_modules`` for peft: suffixes translated to transformers names, or (for a regex) the exact paths of
    the adapted modules, which peft matches by equality."""
    linears = [path for path, m in lora_modules(model, plugin) if isinstance(m, LoRALinear)]
    if isinstance(cfg.targets, list) and cfg.targets:
        suffixes = set()
        for s in cfg.targets:
            leaf = s.rsplit(".", 1)[-1]
            matched = [p for p in linears if p == s or p.endswith("." + s)]
            # A multi-part suffix (attention.o_proj) becomes the matching tail of the transformers path.
            n = s.count(".") + 1
            suffixes |= {".".join(hf_module_path(p).split(".")[-n:]) for p in matched} or {leaf}
        return sorted(suffixes)
    if cfg.targets == ALL_LINEAR:  # peft stores all-linear resolved to the leaf names it found
        return sorted({hf_module_path(p).rsplit(".", 1)[-1] for p in linears})
    return sorted(hf_module_path(p) for p in linears)


def adapter_config(model: nn.Module, config: JobConfig, plugin: str = SECTION) -> dict[str, Any]:
    """``adapter_config.json`` as peft's ``LoraConfig.save_pretrained`` writes it. Patterns are resolved to the
    transformers paths of the modules whose rank or alpha differs from ``r`` / ``alpha``; ``modules_to_save`` (and
    ``ensure_weight_tying``) as :func:`plugins.peft.modules_to_save.peft_fields` gives them."""
    cfg: LoRAConfig = getattr(config, SECTION)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    target_parameters: set[str] = set()
    for path, m in lora_modules(model, plugin):
        adapters = {"": m.lora} if isinstance(m, LoRALinear) else m.adapters()
        for name, lora in adapters.items():
            key = hf_module_path(path) + (f".{name}" if name else "")
            if name:
                target_parameters.add(".".join(key.split(".")[-3:]))  # mlp.experts.<weight>
            if lora.r != cfg.r:
                rank_pattern[key] = lora.r
            alpha = pattern_value(cfg.alpha_pattern, f"{path}.{name}" if name else path, cfg.alpha)
            if alpha != cfg.alpha:
                alpha_pattern[key] = alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.model.init_from or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": _hf_targets(cfg, model, plugin),
        "target_parameters": sorted(target_parameters) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True if cfg.init == "kaiming" else "gaussian",
        "bias": "none",
        "fan_in_fan_out": False,
        **peft_fields(model, resolve(model, cfg.modules_to_save, SECTION)),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
        "inference_mode": True,
        "revision": None,
    }


@hookimpl
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    if export_format != EXPORT_FORMAT:
        return None
    saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
    tensors = {**adapter_tensors(model, deferred=True), **peft_tensors(model, saved)}
    return write_adapter(output_dir, tensors, adapter_config(model, config))


@hookimpl
def expertrain_merge_adapters(model: nn.Module) -> list[str] | None:
    """``expertrain export hf --merge``: fold every adapter into its base weight and leave plain modules (an adapted
    ``nn.Linear`` becomes an ``nn.Linear`` holding ``W + s·B·A``; adapted experts drop their adapters)."""
    merged = []
    for path, module in lora_modules(model):
        module.merge()
        if isinstance(module, LoRALinear):
            restore_plain_linear(model, path, module)
        else:
            module.lora_gate_up_proj = None
            module.lora_down_proj = None
            module.merged = False  # nothing left to add or subtract
        merged.append(path)
    return merged or None


@hookimpl
def expertrain_merge_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The streamed ``export hf --merge``: ``W += s·B·A`` on base tensor ``name`` when an adapter targets it (the
    same arithmetic as :func:`expertrain_merge_adapters`, so the same bytes)."""
    return merge_into_tensor(model, SECTION, name, tensor)


@hookimpl
def expertrain_train_end(model: nn.Module, summary: dict[str, Any]) -> None:
    n = len(lora_modules(model))
    summary["lines"].append(
        f"lora            {n} adapted modules; export the adapters with "
        f"`expertrain export {EXPORT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>`"
    )
