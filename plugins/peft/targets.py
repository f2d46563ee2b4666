"""Which modules a PEFT plugin adapts, shared by every method that wraps linear layers or routed experts.

A target spec is one of (peft's ``target_modules`` semantics, on our module paths such as
``layers.0.attention.q_proj``):

- a list of module-name suffixes: a path matches ``s`` when it is ``s`` or ends in ``.s`` (``q_proj``,
  ``attention.o_proj``, ``layers.0.ffn.down_proj``);
- a regular expression string, matched against the whole path (``re.fullmatch``);
- ``all-linear``: every adaptable ``nn.Linear`` except the LM head (``output``).

Adaptable ``nn.Linear`` modules are those the model calls as modules: attention and dense-MLP projections, and the
LM head. The linear parts of MoE blocks (routers, shared experts) are read as weights by their block, so a wrapper
would be bypassed; they are never selected. The routed experts (fused 3-D weights) are selected separately, as
whole :class:`~framework.models.moe.experts.GroupedExperts` modules (``target_experts``).

A spec part that matches nothing is a :class:`~framework.config.ConfigError` naming it. :func:`claim` marks an
adapted module with its plugin, so two methods adapting the same module fail at transform time.
:func:`pattern_value` resolves peft's ``rank_pattern`` / ``alpha_pattern``; :func:`format_coverage` writes the
start-up coverage line.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from framework.config import ConfigError
from framework.models.moe import GroupedExperts
from framework.models.sharding import local_box, local_part

ALL_LINEAR = "all-linear"
LM_HEAD = "output"
OWNER_ATTR = "_expertrain_adapted_by"
"""Attribute naming the plugin that adapted a module (set by :func:`claim`)."""

TargetSpec = list[str] | str
V = TypeVar("V")
M = TypeVar("M", bound=nn.Module)


@dataclass
class Targets:
    """The modules a spec selected, in model order: ``(module path, module)`` pairs."""

    linears: list[tuple[str, nn.Linear]] = field(default_factory=list)
    experts: list[tuple[str, GroupedExperts]] = field(default_factory=list)


def adaptable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` the model calls as a module (not inside an MoE block), in model order."""
    moe_blocks = model.moe_layers() if hasattr(model, "moe_layers") else []
    inside_moe = {id(m) for block in moe_blocks for m in block.modules()}
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in inside_moe and not _inside_adapter(path, model)
    ]


def _inside_adapter(path: str, model: nn.Module) -> bool:
    """True for a Linear nested in an already adapted module (e.g. a MoLA projection's router)."""
    parts = path.split(".")
    return any(hasattr(model.get_submodule(".".join(parts[:i])), OWNER_ATTR) for i in range(1, len(parts)))


def routed_experts(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """Every fused routed-experts module, in model order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, GroupedExperts)]


_NO_MATCH_HINT = (
    "module paths look like layers.0.attention.q_proj or layers.1.ffn.down_proj; the linear parts of MoE blocks "
    "(routers, shared experts) cannot be adapted, and the routed experts are chosen with target_experts"
)


def _suffix_match(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def select_targets(
    model: nn.Module, spec: TargetSpec, target_experts: bool = False, section: str = "lora"
) -> Targets:
    """The linear modules ``spec`` selects (and, with ``target_experts``, every routed-experts module).

    Raises :class:`ConfigError` on ``<section>.targets`` (or the list entry) when a spec part matches nothing, and
    on ``<section>.target_experts`` when the model has no routed experts."""
    candidates = adaptable_linears(model)
    key = f"{section}.targets"
    if isinstance(spec, str) and spec == ALL_LINEAR:
        linears = [(p, m) for p, m in candidates if p != LM_HEAD]
        if not linears:
            raise ConfigError(
                key, spec, f"expected a model with adaptable nn.Linear modules; {_NO_MATCH_HINT}"
            )
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ConfigError(key, spec, f"expected a valid regular expression ({exc})") from None
        linears = [(p, m) for p, m in candidates if pattern.fullmatch(p)]
        if not linears:
            raise ConfigError(
                key, spec, f"expected a regular expression matching whole module paths; {_NO_MATCH_HINT}"
            )
    elif not spec:  # experts only
        if not target_experts:
            raise ConfigError(
                key, spec, f"expected module-name suffixes, a regular expression or '{ALL_LINEAR}'"
            )
        linears = []
    else:
        for i, suffix in enumerate(spec):
            if not any(_suffix_match(p, suffix) for p, _ in candidates):
                raise ConfigError(
                    f"{key}[{i}]", suffix, f"expected a suffix that names a module; {_NO_MATCH_HINT}"
                )
        linears = [(p, m) for p, m in candidates if any(_suffix_match(p, s) for s in spec)]
    experts = routed_experts(model) if target_experts else []
    if target_experts and not experts:
        raise ConfigError(
            f"{section}.target_experts",
            True,
            "expected a model with routed experts (moe.num_experts > 0 and fused GroupedExperts); set it to false",
        )
    return Targets(linears=linears, experts=experts)


def pattern_value(patterns: Mapping[str, V], path: str, default: V) -> V:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first key ``k`` (a regex or a suffix)
    with ``re.match(rf"(.*\\.)?({k})$", path)``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def claim(module: nn.Module, plugin: str, path: str) -> None:
    """Mark ``module`` as adapted by ``plugin``; a module another plugin already adapted is an error naming both."""
    owner = getattr(module, OWNER_ATTR, None)
    if owner is not None and owner != plugin:
        raise ConfigError(
            "plugins",
            path,
            f"expected each module adapted by one method, but plugins '{owner}' and '{plugin}' both adapt {path}; "
            "give them disjoint targets or drop one of them",
        )
    setattr(module, OWNER_ATTR, plugin)


def format_coverage(plugin: str, model: nn.Module, targets: Targets, trainable: int, detail: str = "") -> str:
    """One line: adapted modules by name, adapted expert layers and experts, ``detail`` (e.g. rank and alpha), and
    the trainable parameter count as a fraction of the model's total (adapters included)."""
    total = sum(p.numel() for p in model.parameters())
    by_name = Counter(path.rsplit(".", 1)[-1] for path, _ in targets.linears)
    parts = []
    if targets.linears:
        parts.append(
            f"{len(targets.linears)} linear modules ({', '.join(f'{n} x{c}' for n, c in by_name.items())})"
        )
    if targets.experts:
        n_experts = sum(m.num_experts for _, m in targets.experts)
        parts.append(f"the routed experts of {len(targets.experts)} MoE layers ({n_experts} experts)")
    line = f"{plugin}: adapted {' and '.join(parts)}"
    if detail:
        line += f"; {detail}"
    return f"{line}; {trainable:,} trainable parameters = {100 * trainable / max(total, 1):.2f}% of {total:,}"


def check_target_spec(section: str, targets: Any) -> None:
    """An empty target list is refused (a regex string or ``all-linear`` always says something)."""
    if isinstance(targets, list) and not targets:
        raise ConfigError(
            f"{section}.targets", targets, f"expected module-name suffixes, a regex or '{ALL_LINEAR}'"
        )


def owned_modules(model: nn.Module, plugin: str, types: type[M] | tuple[type[M], ...]) -> list[tuple[str, M]]:
    """``(module path, module)`` of every module of ``types`` that ``plugin`` adapted (:func:`claim`), in model
    order."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, types) and getattr(m, OWNER_ATTR, None) == plugin
    ]


def restore_plain_linear(model: nn.Module, path: str, module: nn.Linear) -> None:
    """Put a plain ``nn.Linear`` holding ``module``'s (merged) ``weight`` / ``bias`` Parameters at ``path``."""
    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    plain.weight, plain.bias = module.weight, module.bias
    model.set_submodule(path, plain)


def restore_plain_experts(model: nn.Module, path: str, experts: GroupedExperts) -> None:
    """Put a plain :class:`GroupedExperts` holding ``experts``' (merged) fused weights at ``path``."""
    with torch.device("meta"):
        plain = GroupedExperts(experts.num_experts, experts.dim, experts.hidden, experts.impl)
    plain.gate_up_proj, plain.down_proj = experts.gate_up_proj, experts.down_proj
    model.set_submodule(path, plain)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``, detached: gathered when it is a DTensor (a collective every rank of its mesh must
    call, for the same tensors in the same order). May share storage with ``tensor`` (a plain or replicated one):
    compute new values from it before writing them back."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


@torch.no_grad()
def write_whole(tensor: torch.Tensor, whole: torch.Tensor) -> None:
    """Set ``tensor`` (plain, or this rank's shard of a DTensor) from ``whole``, the whole tensor's values (the same
    on every rank): each rank copies its own box, no communication."""
    local = local_part(tensor)
    local.copy_(whole[local_box(tensor)].to(local.device, local.dtype))
