"""``modules_to_save``: base modules an adapter plugin trains in full alongside its adapters (peft's option of the
same name and meaning), shared by every adapter plugin (lora, corda, soka, compacter, lift, mola).

An entry names a module like peft (``lm_head``, ``embed_tokens``, ``norm``, ``input_layernorm``, or a longer path
such as ``model.layers.0.input_layernorm``) or like expertrain (``output``, ``tok_embeddings``, ``norm``,
``attention_norm``, ``ffn_norm``, ``layers.0.attention_norm``): it selects every savable module whose path, in either
naming, is the entry or ends in ``.<entry>`` (so ``norm`` is the final norm only; peft's plain ``str.endswith`` would
also take every ``*_layernorm``). Savable are the token embedding, the LM head and every RMSNorm of the base model,
whose Hugging Face tensors are plain copies of ours. An entry that selects nothing, or a module an adapter plugin
already adapts, is a :class:`~framework.config.ConfigError` naming the key and listing the valid names.

Tied embeddings (``model.tie_embeddings``): the head and the embedding are one matrix, so naming either trains that
one matrix in both roles. That is peft's ``ensure_weight_tying=True``; peft's default (``False``) trains an untied
copy of the named module and leaves the other one frozen, which a tied model cannot hold.

Export (:func:`peft_fields`, :func:`peft_tensors`): peft's ``adapter_model.safetensors`` holds each module's tensors
as ``base_model.model.<transformers path>.<tensor>`` (what ``get_peft_model_state_dict`` writes for a
``ModulesToSaveWrapper``, the adapter name dropped) and ``adapter_config.json`` the transformers paths in
``modules_to_save`` (full paths, so peft's suffix rule selects exactly these modules). Under tied embeddings it
writes ``modules_to_save: [model.embed_tokens]``, ``ensure_weight_tying: true`` and both the embedding's and the
head's key, as peft's own ``save_pretrained`` does. The plugins' own formats hold the same tensors under the
transformers state-dict names (:func:`hf_tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from framework.config import ConfigError, option
from framework.models.norms import RMSNorm
from plugins.peft.low_rank import PEFT_PREFIX, hf_module_path
from plugins.peft.targets import OWNER_ATTR, whole_tensor

EMBEDDING = "tok_embeddings"
LM_HEAD = "output"
HF_EMBEDDING = "model.embed_tokens"

DOC = (
    "Base modules trained in full alongside the adapters (peft's modules_to_save): peft names (lm_head, "
    "embed_tokens, norm, input_layernorm, post_attention_layernorm, or a path such as "
    "model.layers.0.input_layernorm) or ours (output, tok_embeddings, norm, attention_norm, ffn_norm); norm is the "
    "final norm only. Exported under peft's keys."
)


def modules_to_save_option() -> Any:
    """The ``modules_to_save`` field of an adapter plugin's config section (default: none, the base stays frozen)."""
    return option(default_factory=list, doc=DOC)


@dataclass(frozen=True)
class SavedModule:
    """One module trained in full: our path, the transformers path, and its parameters as
    ``{name in the module: name in model.named_parameters()}`` (a tied head's weight is the embedding's)."""

    path: str
    hf_path: str
    parameters: dict[str, str]


def savable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module ``modules_to_save`` may name: the token embedding, the LM head and every
    RMSNorm, in model order."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if (path in (EMBEDDING, LM_HEAD) or isinstance(m, RMSNorm)) and _hf_path(path) is not None
    ]


def _hf_path(path: str) -> str | None:
    """The transformers path of our module ``path``; ``None`` for a module transformers has no place for."""
    try:
        return hf_module_path(path)
    except ValueError:
        return None


def _matches(path: str, entry: str) -> bool:
    """Whether ``entry`` names the module at our ``path``: in our naming or the transformers one, whole or as a
    dotted tail."""
    names = (path, hf_module_path(path))
    return any(name == entry or name.endswith("." + entry) for name in names)


def _valid_names(savable: list[tuple[str, nn.Module]]) -> str:
    seen: dict[str, str] = {}
    for path, _ in savable:
        ours, hf = path.rsplit(".", 1)[-1], hf_module_path(path).rsplit(".", 1)[-1]
        seen.setdefault(hf, ours)
    return ", ".join(hf if hf == ours else f"{hf} ({ours})" for hf, ours in seen.items())


def resolve(model: nn.Module, entries: Sequence[str], section: str) -> list[SavedModule]:
    """The modules ``entries`` (``<section>.modules_to_save``) select, in model order, each once.

    Raises :class:`ConfigError` on ``<section>.modules_to_save[i]`` for an entry that selects no savable module and
    for a selected module that an adapter plugin adapts (train it in full or adapt it, not both)."""
    if not entries:
        return []
    savable = savable_modules(model)
    # named_parameters() lists a shared Parameter once: a tied head's weight is named as the embedding's.
    names_of = {id(p): n for n, p in model.named_parameters()}
    selected: dict[str, SavedModule] = {}
    for i, entry in enumerate(entries):
        key = f"{section}.modules_to_save[{i}]"
        if not isinstance(entry, str) or not entry:
            raise ConfigError(key, entry, "expected a module name such as lm_head, embed_tokens or norm")
        hits = [(path, m) for path, m in savable if _matches(path, entry)]
        if not hits:
            raise ConfigError(
                key,
                entry,
                f"expected a module of the base model to train in full, one of: {_valid_names(savable)} "
                "(or a longer path, such as model.layers.0.input_layernorm)",
            )
        for path, module in hits:
            owner = getattr(module, OWNER_ATTR, None)
            if owner is not None:
                raise ConfigError(
                    key,
                    entry,
                    f"expected a module no adapter adapts, but plugin '{owner}' adapts {path}: train it in full "
                    f"(modules_to_save) or adapt it ({owner}.targets), not both",
                )
            params = {n: names_of[id(p)] for n, p in module.named_parameters(recurse=False)}
            selected[path] = SavedModule(path, hf_module_path(path), params)
    order = {path: i for i, (path, _) in enumerate(savable)}
    return sorted(selected.values(), key=lambda s: order[s.path])


def trainable_names(saved: Sequence[SavedModule]) -> list[str]:
    """The parameter names (as in ``model.named_parameters()``) of the saved modules, each once."""
    return list(dict.fromkeys(name for s in saved for name in s.parameters.values()))


def is_tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the token embedding's Parameter (``model.tie_embeddings``)."""
    return getattr(model, LM_HEAD).weight is getattr(model, EMBEDDING).weight


def _with_tied_partner(model: nn.Module, saved: Sequence[SavedModule]) -> list[SavedModule]:
    """``saved`` plus the other role of a tied embedding/head matrix: both hold the trained values."""
    paths = {s.path for s in saved}
    if not is_tied(model) or not paths & {EMBEDDING, LM_HEAD}:
        return list(saved)
    extra = [
        SavedModule(p, hf_module_path(p), {"weight": f"{EMBEDDING}.weight"})
        for p in (EMBEDDING, LM_HEAD)
        if p not in paths
    ]
    return [*saved, *extra]


def coverage_detail(model: nn.Module, saved: Sequence[SavedModule]) -> tuple[str, int]:
    """The coverage line's words for the saved modules (empty when none) and their parameter count."""
    if not saved:
        return "", 0
    params = dict(model.named_parameters())
    count = sum(params[n].numel() for n in trainable_names(saved))
    names = ", ".join(s.hf_path for s in saved)
    tied = (
        " (tied: the embedding and the head, one matrix)" if is_tied(model) and _touches_tied(saved) else ""
    )
    return f"modules_to_save {names}{tied}: {count:,} parameters trained in full", count


def _touches_tied(saved: Sequence[SavedModule]) -> bool:
    return any(s.path in (EMBEDDING, LM_HEAD) for s in saved)


def peft_tensors(model: nn.Module, saved: Sequence[SavedModule]) -> dict[str, torch.Tensor]:
    """The saved modules' tensors under peft's keys, ``base_model.model.<transformers path>.<tensor>`` (whole, on
    the CPU); under tied embeddings both ``lm_head.weight`` and ``model.embed_tokens.weight``, as peft saves them."""
    return {f"{PEFT_PREFIX}{key}": value for key, value in hf_tensors(model, saved).items()}


def hf_tensors(model: nn.Module, saved: Sequence[SavedModule]) -> dict[str, torch.Tensor]:
    """The saved modules' tensors under their transformers state-dict names (``lm_head.weight``,
    ``model.norm.weight``), whole, on the CPU; under tied embeddings both the head's and the embedding's name (the
    same values). The plugins' own export formats in transformers naming store them so."""
    params = dict(model.named_parameters())
    return {
        f"{s.hf_path}.{local}": whole_tensor(params[name]).cpu().contiguous().clone()
        for s in _with_tied_partner(model, saved)
        for local, name in s.parameters.items()
    }


def peft_fields(model: nn.Module, saved: Sequence[SavedModule]) -> dict[str, object]:
    """``modules_to_save`` for ``adapter_config.json``: the transformers paths (``None`` when nothing is saved); a
    tied embedding/head as peft's ``ensure_weight_tying`` stores it (``model.embed_tokens`` in place of ``lm_head``,
    and ``ensure_weight_tying: true``, written only then)."""
    if not saved:
        return {"modules_to_save": None}
    if not (is_tied(model) and _touches_tied(saved)):
        return {"modules_to_save": [s.hf_path for s in saved]}
    paths = [s.hf_path for s in saved if s.path not in (EMBEDDING, LM_HEAD)]
    return {"modules_to_save": [*paths, HF_EMBEDDING], "ensure_weight_tying": True}


def native_tensors(model: nn.Module, saved: Sequence[SavedModule]) -> dict[str, torch.Tensor]:
    """The saved modules' tensors under our state-dict names (``output.weight``, ``norm.weight``; a tied head is
    ``tok_embeddings.weight``), whole, on the CPU: for export formats written in our naming."""
    params = dict(model.named_parameters())
    return {name: whole_tensor(params[name]).cpu().contiguous().clone() for name in trainable_names(saved)}


def format_fields(
    model: nn.Module, saved: Sequence[SavedModule], naming: Literal["hf", "ours"] = "hf"
) -> dict[str, object]:
    """What a plugin's own export config says about the saved modules: ``modules_to_save`` (their paths in the
    format's ``naming``, ``None`` when nothing is saved) and ``tied_embeddings`` (the head and the embedding are one
    trained matrix)."""
    return {
        "modules_to_save": [s.hf_path if naming == "hf" else s.path for s in saved] or None,
        "tied_embeddings": bool(saved) and is_tied(model) and _touches_tied(saved),
    }
