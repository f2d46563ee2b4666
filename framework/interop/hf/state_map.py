"""Hugging Face state dict ↔ ours, both ways, for the families of :mod:`framework.interop.hf.config_map`.

Each of our parameter names maps to one rule: the HF tensor(s) it comes from and how (a rename, a stack of
per-expert matrices, a row permutation). A rule has one or more *forms*; the writer writes the first, the reader
accepts any of them:

- experts: the on-disk per-expert keys of hub checkpoints and of transformers' own ``save_pretrained``
  (``mlp.experts.<e>.gate_proj/up_proj/down_proj.weight``; Mixtral ``block_sparse_moe.experts.<e>.w1/w3/w2.weight``)
  first, then transformers 5's in-memory fused ``mlp.experts.gate_up_proj [E, 2I, D]`` / ``down_proj [E, D, I]``;
- Mixtral's router and experts under ``block_sparse_moe.`` (on disk) or ``mlp.`` (in memory);
- deepseek_v3 with ``rope_interleave``: the rows of ``q_proj`` / ``q_b_proj`` and ``kv_a_proj_with_mqa`` that feed
  RoPE are reordered (interleaved pairs -> even dimensions then odd) so that our ``rotate_half`` RoPE computes
  exactly DeepSeek's interleaved rotation (see :mod:`framework.models.mla`); the writer restores the order.

Nothing is dropped silently: a checkpoint tensor no rule consumes, a parameter of ours no rule fills, a missing
tensor and a shape mismatch each raise :class:`HFCheckpointError` naming the tensor; these checks read names and
header shapes only.

Reading (:func:`hf_to_native`) fills a *box* of each of our tensors (a rank's shard, or the whole tensor) and reads
only the stored slices that box needs: a rename reads the box itself, stacked experts read only the box's experts
(each in the box's rows and columns), transformers' fused ``gate_up_proj`` the box's rows of each half, and a RoPE
row reordering the span of rows its heads hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

from framework.errors import CheckpointFormatError


class HFCheckpointError(CheckpointFormatError):
    """A Hugging Face checkpoint whose tensors do not match the model its config describes."""


Box = tuple[slice, ...]
"""A global index box, one ``slice(start, stop)`` per dimension (:func:`framework.models.sharding.local_box`)."""


class StoredTensor(Protocol):
    """One tensor of a checkpoint on disk: its shape from the file's header, and reads of index boxes."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, box: Box | None = None) -> torch.Tensor:
        """The values in ``box`` (the whole tensor when None), reading only those bytes."""
        ...


Reader = Callable[[Sequence[StoredTensor], Box, torch.Tensor], None]
"""Fills ``out`` with our tensor's values in ``box`` from the stored HF tensors of a form."""


@dataclass(frozen=True)
class Form:
    """One way HF stores a parameter: the HF keys and the conversions to and from our tensor."""

    hf_keys: tuple[str, ...]
    to_native: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    read_box: Reader | None = None
    """Reads only the slices of the HF tensors that a box of our tensor needs; None: read them whole, convert,
    cut the box (the smallest whole unit, for conversions that do not map boxes to boxes)."""

    def fill(self, stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
        """Copy our tensor's values in ``box`` (slices with explicit start and stop) into ``out``."""
        if self.read_box is not None:
            self.read_box(stored, box, out)
        else:
            out.copy_(self.to_native([s.read() for s in stored])[box])


@dataclass(frozen=True)
class Rule:
    """Our parameter ``native`` and the forms it may take in a HF checkpoint (``forms[0]`` is written)."""

    native: str
    forms: tuple[Form, ...]


def _span(s: slice) -> range:
    return range(s.start, s.stop)


def _copy(key: str) -> Form:
    return Form((key,), lambda ts: ts[0], lambda t: [t], _read_copy)


def _read_copy(stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
    out.copy_(stored[0].read(box))


def _permuted(key: str, perm: torch.Tensor) -> Form:
    inverse = torch.argsort(perm)
    return Form((key,), lambda ts: _rows(ts[0], perm), lambda t: [t[inverse]], partial(_read_rows, perm))


def _rows(value: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    if value.shape[0] != len(perm):
        raise RuntimeError(f"expected {len(perm)} rows to reorder")
    return value[perm]


def _read_rows(perm: torch.Tensor, stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
    """Rows ``perm[box[0]]``, read as runs of consecutive stored rows (one run per head when the box holds whole
    heads: the RoPE reordering stays inside each head), so exactly the box's bytes are read."""
    rows, order = torch.sort(perm[box[0]])
    if not len(rows):
        return
    starts = [0, *(torch.nonzero(rows.diff() != 1).flatten() + 1).tolist(), len(rows)]
    runs = [
        stored[0].read((slice(int(rows[a]), int(rows[b - 1]) + 1), *box[1:]))
        for a, b in zip(starts, starts[1:])
    ]
    out.copy_(torch.cat(runs)[torch.argsort(order)])


def _stacked(keys: list[str]) -> Form:
    """``E`` per-expert matrices <-> one ``[E, ...]`` tensor."""
    return Form(tuple(keys), lambda ts: torch.stack(ts), lambda t: list(t.unbind(0)), _read_stacked)


def _read_stacked(stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
    """Only the box's experts are read, each only in the box's rows and columns."""
    for j, e in enumerate(_span(box[0])):
        out[j].copy_(stored[e].read(box[1:]))


def _stacked_gate_up(gate_keys: list[str], up_keys: list[str]) -> Form:
    """Per-expert gate and up ``[I, D]`` matrices <-> our ``gate_up_proj [E, 2, I, D]``."""
    E = len(gate_keys)
    return Form(
        tuple(gate_keys + up_keys),
        lambda ts: torch.stack((torch.stack(ts[:E]), torch.stack(ts[E:])), dim=1),
        lambda t: list(t[:, 0].unbind(0)) + list(t[:, 1].unbind(0)),
        _read_stacked_gate_up,
    )


def _read_stacked_gate_up(stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
    """``stored``: the ``E`` gate matrices, then the ``E`` up matrices; the box's experts, halves, rows, columns."""
    E = len(stored) // 2
    for h, half in enumerate(_span(box[1])):
        for j, e in enumerate(_span(box[0])):
            out[j, h].copy_(stored[half * E + e].read(box[2:]))


def _fused_gate_up(key: str) -> Form:
    """transformers' fused ``[E, 2I, D]`` (gate rows first) <-> our ``[E, 2, I, D]`` (the same memory)."""
    return Form(
        (key,),
        lambda ts: ts[0].unflatten(1, (2, ts[0].shape[1] // 2)),
        lambda t: [t.flatten(1, 2)],
        _read_fused_gate_up,
    )


def _read_fused_gate_up(stored: Sequence[StoredTensor], box: Box, out: torch.Tensor) -> None:
    hidden = stored[0].shape[1] // 2
    experts, halves, rows, cols = box
    for h, half in enumerate(_span(halves)):
        offset = half * hidden
        out[:, h].copy_(stored[0].read((experts, slice(offset + rows.start, offset + rows.stop), cols)))


def _rope_rows_perm(groups: int, group_size: int, rope_offset: int, rope_dim: int) -> torch.Tensor:
    """Row order that turns interleaved RoPE pairs into even-then-odd inside each ``group`` of rows."""
    within = torch.arange(group_size)
    deinterleave = torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))
    within[rope_offset : rope_offset + rope_dim] = rope_offset + deinterleave
    return (torch.arange(groups).unsqueeze(1) * group_size + within).flatten()


@dataclass(frozen=True)
class Layout:
    """What the rules need to know beyond our parameter names."""

    family: str
    n_experts: Mapping[int, int]
    """MoE layer index -> routed experts."""
    rope_interleave: bool = False
    n_heads: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    kv_lora_rank: int = 0


_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def rules_for(native_keys: Iterable[str], layout: Layout, tied: bool) -> list[Rule]:
    """One rule per parameter of ours (``output.weight`` skipped when tied: HF stores the embedding once).

    Raises :class:`HFCheckpointError` for a parameter the family has no place for (e.g. a plugin's adapter)."""
    rules = []
    for key in native_keys:
        if key == "output.weight":
            if not tied:
                rules.append(Rule(key, (_copy("lm_head.weight"),)))
            continue
        if key in _TOP:
            rules.append(Rule(key, (_copy(_TOP[key]),)))
            continue
        match = _LAYER.fullmatch(key)
        forms = _layer_forms(int(match.group(1)), match.group(2), layout) if match else None
        if not forms:
            raise HFCheckpointError(
                f"model parameter '{key}' has no counterpart in a Hugging Face {layout.family} checkpoint; "
                "export a model without it (merge or drop adapters first)"
            )
        rules.append(Rule(key, forms))
    return rules


def _layer_forms(i: int, name: str, layout: Layout) -> tuple[Form, ...] | None:
    hf = f"model.layers.{i}."
    simple = {
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    if name in simple:
        return (_copy(hf + simple[name]),)
    if name.startswith("attention."):
        return _attention_forms(hf + "self_attn." + name.removeprefix("attention."), layout)
    if not name.startswith("ffn."):
        return None
    ffn = name.removeprefix("ffn.")
    if i not in layout.n_experts:
        if re.fullmatch(r"(gate|up|down)_proj\.weight", ffn):
            return (_copy(hf + "mlp." + ffn),)
        return None
    # Mixtral writes ``block_sparse_moe.`` (its hub layout) and reads either prefix.
    prefixes = ["block_sparse_moe.", "mlp."] if layout.family == "mixtral" else ["mlp."]
    if ffn == "router.gate.weight":
        return tuple(_copy(hf + p + "gate.weight") for p in prefixes)
    if ffn == "router.expert_bias":
        return (_copy(hf + "mlp.gate.e_score_correction_bias"),)
    E = layout.n_experts[i]
    gate, up, down = (
        ("w1", "w3", "w2") if layout.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    )
    if ffn == "experts.gate_up_proj":
        per_expert = [
            _stacked_gate_up(
                [f"{hf}{p}experts.{e}.{gate}.weight" for e in range(E)],
                [f"{hf}{p}experts.{e}.{up}.weight" for e in range(E)],
            )
            for p in prefixes
        ]
        return (*per_expert, *(_fused_gate_up(f"{hf}{p}experts.gate_up_proj") for p in prefixes))
    if ffn == "experts.down_proj":
        per_expert = [_stacked([f"{hf}{p}experts.{e}.{down}.weight" for e in range(E)]) for p in prefixes]
        return (*per_expert, *(_copy(f"{hf}{p}experts.down_proj") for p in prefixes))
    shared = {"qwen2_moe": "mlp.shared_expert.", "deepseek_v3": "mlp.shared_experts."}.get(layout.family)
    if shared and re.fullmatch(r"shared_experts\.(gate|up|down)_proj\.weight", ffn):
        return (_copy(hf + shared + ffn.removeprefix("shared_experts.")),)
    if layout.family == "qwen2_moe" and ffn == "shared_experts.gate.weight":
        return (_copy(hf + "mlp.shared_expert_gate.weight"),)
    return None


def _attention_forms(key: str, layout: Layout) -> tuple[Form, ...]:
    if layout.rope_interleave:
        qk = layout.qk_nope_head_dim + layout.qk_rope_head_dim
        if key.endswith((".q_proj.weight", ".q_b_proj.weight")):
            return (
                _permuted(
                    key, _rope_rows_perm(layout.n_heads, qk, layout.qk_nope_head_dim, layout.qk_rope_head_dim)
                ),
            )
        if key.endswith(".kv_a_proj_with_mqa.weight"):
            size = layout.kv_lora_rank + layout.qk_rope_head_dim
            return (_permuted(key, _rope_rows_perm(1, size, layout.kv_lora_rank, layout.qk_rope_head_dim)),)
    return (_copy(key),)


# --------------------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class NativeTarget:
    """Where one of our tensors is loaded: its global ``shape``, the ``box`` of it this rank holds (the whole
    tensor unless it is sharded) and ``out``, the local tensor of the box's shape to write."""

    shape: torch.Size
    box: Box
    out: torch.Tensor


def hf_to_native(
    stored: Mapping[str, StoredTensor],
    rules: Sequence[Rule],
    targets: Mapping[str, NativeTarget],
    family: str,
    tied_to: str | None = None,
    skipped: Collection[str] = (),
) -> None:
    """Fill each rule's target from the HF tensors ``stored`` (key -> tensor on disk), reading only its box.

    Every check runs first, on names and header shapes alone: each rule needs a form whose tensors are all there
    and convert to the target's shape, and every HF tensor must be used by a rule or listed in ``skipped`` (the
    tensors of parameters the caller chose not to fill). ``tied_to``: with tied embeddings, the HF key the LM head
    shares; a stored ``lm_head.weight`` is then accepted only if it equals it (compared in the embedding's box).
    """
    shapes = {name: target.shape for name, target in targets.items()}
    forms = check_hf_tensors(stored, rules, shapes, family, tied_to, skipped)
    for rule, form in zip(rules, forms):
        target = targets[rule.native]
        form.fill([stored[k] for k in form.hf_keys], target.box, target.out)
    if tied_to is not None and "lm_head.weight" in stored:
        box = next((targets[r.native].box for r, f in zip(rules, forms) if f.hf_keys == (tied_to,)), None)
        if not torch.equal(stored["lm_head.weight"].read(box), stored[tied_to].read(box)):
            raise HFCheckpointError(
                "checkpoint tensor 'lm_head.weight' differs from the embedding while config.json says "
                "tie_word_embeddings: true; set it to false or drop the tensor"
            )


def check_hf_tensors(
    stored: Mapping[str, StoredTensor],
    rules: Sequence[Rule],
    expected: Mapping[str, Sequence[int]],
    family: str,
    tied_to: str | None = None,
    skipped: Collection[str] = (),
) -> list[Form]:
    """The form each rule reads, after checking names and shapes (see :func:`hf_to_native`); reads no data."""
    available = set(stored).difference(skipped)
    left = set(available)
    forms = []
    for rule in rules:
        form = _pick_form(rule, available)
        _check_shape(rule, form, [stored[k].shape for k in form.hf_keys], tuple(expected[rule.native]))
        left.difference_update(form.hf_keys)
        forms.append(form)
    if tied_to is not None:
        left.discard("lm_head.weight")
    if left:
        extra = sorted(left)
        raise HFCheckpointError(
            f"checkpoint tensor '{extra[0]}' is not used by the {family} converter"
            + (f" (nor {len(extra) - 1} more, e.g. '{extra[-1]}')" if len(extra) > 1 else "")
            + "; the config does not describe it (a layer or expert beyond the config, or a module expertrain "
            "lacks), so loading would drop it"
        )
    return forms


def _check_shape(rule: Rule, form: Form, shapes: list[tuple[int, ...]], expected: tuple[int, ...]) -> None:
    """The conversion run on ``meta`` tensors of the stored shapes must give ``expected``."""
    metas = [torch.empty(s, device="meta") for s in shapes]
    try:
        shape = tuple(form.to_native(metas).shape)
    except RuntimeError as exc:
        raise HFCheckpointError(
            f"checkpoint tensors {_names(form.hf_keys)} cannot form '{rule.native}' {expected}: "
            f"shapes {[tuple(s) for s in shapes]} ({exc})"
        ) from None
    if shape != expected:
        raise HFCheckpointError(
            f"checkpoint tensor {_names(form.hf_keys)} has shape {_shapes(metas)}, which gives {shape} for "
            f"'{rule.native}'; the config describes {expected}"
        )


def _pick_form(rule: Rule, available: set[str]) -> Form:
    for form in rule.forms:
        if all(k in available for k in form.hf_keys):
            return form
    best = max(rule.forms, key=lambda f: sum(k in available for k in f.hf_keys))
    missing = next(k for k in best.hf_keys if k not in available)
    raise HFCheckpointError(
        f"checkpoint tensor '{missing}' is missing (needed for '{rule.native}'); the checkpoint does not match "
        "its config.json"
    )


def rule_to_hf(rule: Rule, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors (key, tensor) that ``rule`` writes for our tensor ``value``, in the order they are written.

    Views of ``value`` where the layout allows (renames, experts unbound from their stack); a ``meta`` tensor gives
    their shapes without any data."""
    form = rule.forms[0]
    return list(zip(form.hf_keys, form.to_hf(value.detach()), strict=True))


def native_to_hf(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """HF tensors (the first form of every rule) from our state dict; each is its own contiguous copy."""
    return {
        key: value.contiguous().clone()
        for rule in rules
        for key, value in rule_to_hf(rule, state[rule.native])
    }


def _names(keys: tuple[str, ...]) -> str:
    return f"'{keys[0]}'" if len(keys) == 1 else f"'{keys[0]}' (+{len(keys) - 1} more)"


def _shapes(values: list[torch.Tensor]) -> object:
    return tuple(values[0].shape) if len(values) == 1 else [tuple(v.shape) for v in values[:2]]
