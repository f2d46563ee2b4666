"""Hugging Face folders read and written: the implementation behind :mod:`framework.interop.hf` (see there)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor

from framework.config.job import JobConfig
from framework.config.sections import MoEConfig
from framework.hooks import PluginManager
from framework.interop.hf.config_map import (
    ARCHITECTURES,
    HFConfigError,
    HFModelSpec,
    hf_config_from_spec,
    spec_from_hf_config,
)
from framework.interop.hf.state_map import (
    HFCheckpointError,
    Layout,
    NativeTarget,
    hf_to_native,
    rules_for,
)
from framework.interop.hf.stream import group_shards, plan_hf_tensors, write_hf_tensors
from framework.models import Transformer, default_registry
from framework.models.moe import MoELayer
from framework.models.sharding import local_box, local_part

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""transformers' default shard size (5 GB)."""


def read_hf_config(path: str | os.PathLike[str]) -> HFModelSpec:
    """The folder's ``config.json`` as an :class:`HFModelSpec` (raises :class:`HFConfigError` naming a field)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise HFCheckpointError(f"'{path}' has no {CONFIG_FILE}: expected a Hugging Face model folder")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise HFCheckpointError(f"'{file}' is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"'{file}' is not a JSON object")
    return spec_from_hf_config(raw)


def hf_config_to_job_sections(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``model`` and ``moe`` describing the folder's model, for a job file."""
    return read_hf_config(path).job_sections()


@dataclass
class HFLoad:
    """What :func:`load_pretrained` returns."""

    model: Transformer
    spec: HFModelSpec
    config: JobConfig
    """A job config holding the model sections (other sections at their defaults)."""
    plugin_manager: PluginManager
    """The plugin manager whose registry built the model (every supported family is built from core components)."""


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    plugin_manager: PluginManager | None = None,
    max_seq_len: int | None = None,
) -> HFLoad:
    """Build the folder's model and load its weights (on the CPU, in ``dtype``; router biases stay fp32). The model
    goes through the training assembly on the ``meta`` device and is allocated once, then every tensor is read
    from the folder (as ``model.init_from: hf:`` does).

    ``plugin_manager``: whose registry builds the model (a fresh one on the core registry by default).
    ``max_seq_len`` overrides ``max_position_embeddings`` (the size of our RoPE tables).
    """
    spec = read_hf_config(path)
    if max_seq_len is not None:
        spec.model = dataclasses.replace(spec.model, max_seq_len=max_seq_len)
    pm = plugin_manager if plugin_manager is not None else PluginManager(default_registry())
    config = JobConfig(model=spec.model, moe=spec.moe)
    model = _assembled(config, pm)
    load_hf_weights(model, path, spec)
    model.hf_rope_interleave = spec.rope_interleave  # read back by save_pretrained
    model.to(dtype)
    model.eval()
    return HFLoad(model, spec, config, pm)


def _assembled(config: JobConfig, pm: PluginManager) -> Transformer:
    """The model of ``config`` through the one model assembly (:func:`~framework.train.assembly.
    assemble_single_process`: built on ``meta``, then allocated once and keyed-initialised), from ``pm``'s registry
    with no plugin hook run (the folder's model is the core one; a caller's plugins have no sections here)."""
    from framework.train.assembly import assemble_single_process

    return assemble_single_process(config, PluginManager(pm.registry)).raw


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    registry: Any = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """Our model from a Hugging Face folder. ``registry``: the component registry to build from (the core one by
    default)."""
    pm = PluginManager(registry if registry is not None else default_registry())
    return load_pretrained(path, dtype=dtype, plugin_manager=pm, max_seq_len=max_seq_len).model


# --------------------------------------------------------------------------------------------------- weights


@dataclass
class HFReadStats:
    """What a load read from a folder's safetensors files: tensor data only (file headers aside)."""

    bytes_read: int = 0
    """Bytes of the tensor slices read (a tensor read twice counts twice)."""
    folder_bytes: int = 0
    """Bytes of every tensor the folder holds."""
    reads: int = 0
    """Slices read."""


_DTYPE_BYTES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2"), 1),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 2),
    **dict.fromkeys(("U32", "I32", "F32"), 4),
    **dict.fromkeys(("U64", "I64", "F64"), 8),
}
"""Bytes per element of safetensors' dtypes."""


class _FileTensor:
    """One tensor of an open safetensors file (a :class:`~framework.interop.hf.state_map.StoredTensor`): its shape
    from the header; a read takes only the requested box's bytes (``get_slice``) and counts them."""

    def __init__(self, handle: Any, key: str, stats: HFReadStats) -> None:
        self._handle, self._key, self._stats = handle, key, stats
        header = handle.get_slice(key)
        self.shape = tuple(header.get_shape())
        self.nbytes = math.prod(self.shape) * _DTYPE_BYTES.get(header.get_dtype(), 0)

    def read(self, box: tuple[slice, ...] | None = None) -> torch.Tensor:
        whole = box is None or not self.shape
        value = self._handle.get_tensor(self._key) if whole else self._handle.get_slice(self._key)[box]
        self._stats.bytes_read += value.numel() * value.element_size()
        self._stats.reads += 1
        return value


@contextmanager
def _open_tensors(path: Path, stats: HFReadStats) -> Iterator[dict[str, _FileTensor]]:
    """key -> tensor on disk over the folder's safetensors (one file or the shards of an index); nothing is read
    but the headers (``stats.folder_bytes``)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as exc:
            raise HFCheckpointError(f"'{index}' is not a safetensors index ({exc})") from None
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" ({', '.join(pickles)} are pickles, which expertrain never loads)" if pickles else ""
        raise HFCheckpointError(
            f"'{path}' has no {WEIGHTS_FILE} or {INDEX_FILE}{hint}; save it as safetensors"
        )
    handles = {}
    try:
        for name in files:
            if not (path / name).is_file():
                raise HFCheckpointError(f"shard '{name}' listed in {INDEX_FILE} is missing from '{path}'")
            try:
                handles[name] = safe_open(str(path / name), framework="pt")
            except SafetensorError as exc:  # truncated, empty or not safetensors at all
                raise HFCheckpointError(
                    f"'{path / name}' is not a readable safetensors file ({exc}); download or save it again"
                ) from None
        tensors: dict[str, _FileTensor] = {}
        for name, handle in handles.items():
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                if weight_map is not None and weight_map.get(key) != name:
                    continue  # the index names the shard that holds the tensor
                tensors[key] = _FileTensor(handle, key, stats)
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(tensors))
            if lost:
                raise HFCheckpointError(f"tensor '{lost[0]}' is listed in {INDEX_FILE} but not in its shard")
        stats.folder_bytes = sum(t.nbytes for t in tensors.values())
        yield tensors
    finally:
        handles.clear()


def _layout(model: Transformer, spec: HFModelSpec) -> Layout:
    n_experts = {i: block.ffn.experts.num_experts for i, block in enumerate(model.layers) if block.is_moe}
    m = spec.model
    return Layout(
        family=spec.family,
        n_experts=n_experts,
        rope_interleave=spec.rope_interleave,
        n_heads=m.n_heads,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        kv_lora_rank=m.kv_lora_rank,
    )


@torch.no_grad()
def load_hf_weights(
    model: Transformer,
    path: str | os.PathLike[str],
    spec: HFModelSpec | None = None,
    keys: Collection[str] | None = None,
) -> HFReadStats:
    """Copy the folder's weights into ``model`` (built from ``spec``'s sections; any dtype).

    The model's tensors may be plain (a whole model: each is read whole) or DTensors of any parallel layout (TP,
    EP, expert TP, FSDP2, HSDP): each rank then reads from the files only the box of each tensor it holds
    (:func:`~framework.models.sharding.local_box`) and writes it into its local shard, one tensor at a time, so it
    never holds more than its shards plus one tensor's slices (what each conversion reads:
    :func:`~framework.interop.hf.state_map.hf_to_native`). ``keys``: our state-dict names to fill (default: all of
    the model's); the others, e.g. adapters a plugin added, are left as they are and not reported missing.

    Raises :class:`HFCheckpointError` naming a missing, surplus or misshapen tensor before any data is read.
    Returns what was read (:class:`HFReadStats`)."""
    folder = Path(path)
    spec = spec or read_hf_config(folder)
    state = {_plain_name(k): v for k, v in model.state_dict().items()}
    wanted = _wanted(state, keys)
    layout, tied = _layout(model, spec), model.model_cfg.tie_embeddings
    rules = rules_for(wanted, layout, tied)
    targets = {
        r.native: NativeTarget(state[r.native].shape, local_box(state[r.native]), local_part(state[r.native]))
        for r in rules
    }
    skipped = _hf_keys_of(set(state) - set(wanted), layout, tied)
    stats = HFReadStats()
    with _open_tensors(folder, stats) as stored:
        embedding = "model.embed_tokens.weight" if tied else None
        hf_to_native(stored, rules, targets, spec.family, tied_to=embedding, skipped=skipped)
    if not any(isinstance(v, DTensor) for v in state.values()):
        model.tie_weights()  # a whole model's head may have been untied by to_empty; sharded models keep the tie
    return stats


def _plain_name(key: str) -> str:
    """A state-dict key without the ``_orig_mod.`` that ``torch.compile`` puts in front of a compiled block's."""
    return key.replace("._orig_mod.", ".")


def _wanted(state: Mapping[str, torch.Tensor], keys: Collection[str] | None) -> list[str]:
    if keys is None:
        return list(state)
    unknown = sorted(set(keys) - set(state))
    if unknown:
        raise HFCheckpointError(f"asked to load '{unknown[0]}', which the model does not have")
    return [k for k in state if k in keys]


def _hf_keys_of(natives: Collection[str], layout: Layout, tied: bool) -> set[str]:
    """HF keys of parameters the caller does not fill (those with no HF counterpart have none)."""
    keys: set[str] = set()
    for native in natives:
        try:
            rules = rules_for([native], layout, tied)
        except HFCheckpointError:
            continue
        keys.update(k for rule in rules for form in rule.forms for k in form.hf_keys)
    return keys


# --------------------------------------------------------------------------------------------------- writing


def spec_from_model(model: Transformer, family: str | None = None) -> HFModelSpec:
    """The :class:`HFModelSpec` of one of our models: its ``model`` section and the core ``moe`` section its MoE
    blocks compute (:func:`core_moe_section`); ``family`` inferred when not given (mla -> deepseek_v3, shared experts
    -> qwen2_moe, q/k norms -> qwen3_moe, other MoE -> mixtral, q/k/v biases -> qwen2, else llama)."""
    m, moe = model.model_cfg, model.moe_cfg
    blocks = model.moe_layers()
    if blocks:
        moe = core_moe_section(blocks[0], moe)
    if family is None:
        family = _infer_family(m, moe)
    if family == "deepseek_v3" and moe.shared_experts:
        hidden = moe.resolved_shared_hidden  # deepseek_v3 counts shared experts of moe_intermediate_size
        if hidden % moe.expert_hidden:
            raise HFConfigError(
                "moe.shared_expert_hidden",
                hidden,
                f"expected a multiple of moe.expert_hidden={moe.expert_hidden} (deepseek_v3 n_shared_experts)",
            )
        moe = dataclasses.replace(moe, shared_experts=hidden // moe.expert_hidden, shared_expert_hidden=0)
    interleave = bool(getattr(model, "hf_rope_interleave", family == "deepseek_v3"))
    return HFModelSpec(family, m, moe, rope_interleave=interleave)


_CORE_COMPUTE = ("forward", "forward_tokens", "route_and_compute")
"""The :class:`MoELayer` methods that decide a block's output: a block overriding none computes as the core block
(``aux_terms`` and ``balance_probs`` shape training losses and metrics only)."""


def core_moe_section(block: Any, moe: MoEConfig) -> MoEConfig:
    """The core ``moe`` section (``block: moe``) whose layers compute what ``block`` computes: ``moe`` itself for a
    core block; for a variant (a plugin's :class:`MoELayer` subclass that changes only training losses or the
    shapes it builds) the routed experts, top-k and shared experts read from the built block through the
    :class:`~framework.models.moe.MoEBlock` contract. A block that computes otherwise (several routing sites, its
    own forward) raises :class:`HFConfigError` naming ``moe.block``."""
    if moe.block == "moe":
        return moe
    overridden = [n for n in _CORE_COMPUTE if getattr(type(block), n, None) is not getattr(MoELayer, n)]
    if not isinstance(block, MoELayer) or overridden or len(block.site_routers()) != 1:
        raise HFConfigError(
            "moe.block",
            moe.block,
            "expected a block that computes as the core 'moe' block to export (one routing site, no own "
            f"{', '.join(overridden) or 'forward'}): Hugging Face families have no layout for it",
        )
    shared = block.shared_experts
    return dataclasses.replace(
        moe,
        block="moe",
        num_experts=block.num_experts,
        top_k=block.top_k,
        expert_hidden=block.experts.hidden,
        shared_experts=1 if shared is not None else 0,
        shared_expert_hidden=shared.hidden if shared is not None else 0,
        shared_expert_gate=shared is not None and shared.gate is not None,
    )


def _infer_family(m: Any, moe: MoEConfig) -> str:
    if m.attention == "mla":
        return "deepseek_v3"
    if moe.num_experts:
        if moe.shared_experts:
            return "qwen2_moe"
        return "qwen3_moe" if m.qk_norm else "mixtral"
    return "qwen2" if m.qkv_bias and not m.o_bias else "llama"


def _moe_layer_experts(shapes: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """MoE layer index -> routed experts, from our tensors' shapes (``layers.<i>.ffn.experts.gate_up_proj``)."""
    out = {}
    for key, shape in shapes.items():
        match = _EXPERTS_KEY.fullmatch(key)
        if match:
            out[int(match.group(1))] = int(shape[0])
    return out


_EXPERTS_KEY = re.compile(r"layers\.(\d+)\.ffn\.experts\.gate_up_proj")


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike[str],
    *,
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Any = None,
) -> list[str]:
    """Write ``model`` as a Hugging Face folder: ``config.json`` and ``model.safetensors`` (or shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``); ``tokenizer`` (anything with ``save(folder)``,
    e.g. :class:`~framework.data.tokenizer.Tokenizer`) is written beside them. Returns the file names written.

    ``family``: the ``model_type`` to write (one of ``ARCHITECTURES``); inferred by default
    (:func:`spec_from_model`). Raises :class:`HFConfigError` naming the field the family cannot hold. The files are
    written tensor by tensor (no second copy of the model in memory).

    A model sharded over ranks (DTensor parameters of any layout: FSDP2, TP, EP) is saved collectively: every rank
    calls this; each tensor is gathered whole (``full_tensor``) one at a time, in writing order, and rank 0 writes
    it, so no rank holds more than its shards plus one whole tensor. The folder is the one a whole model gives; the
    other ranks write nothing and get ``[]``."""
    _check_family(family)
    spec = spec_from_model(model, family)
    state = model.state_dict()
    dtype = next(p.dtype for p in model.parameters())
    sharded = any(isinstance(v, DTensor) for v in state.values())
    writer = not sharded or torch.distributed.get_rank() == 0

    def load(name: str) -> torch.Tensor:
        value = state[name]
        return value.full_tensor() if isinstance(value, DTensor) else value

    return write_pretrained(
        spec,
        {k: v.shape for k, v in state.items()},
        {k: v.dtype for k, v in state.items()},
        load,
        path,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer,
        write=writer,
    )


def _check_family(family: str | None) -> None:
    if family is not None and family not in ARCHITECTURES:
        raise HFConfigError("model_type", family, f"expected one of {', '.join(ARCHITECTURES)}")


def write_pretrained(
    spec: HFModelSpec,
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, torch.dtype],
    load: Callable[[str], torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Any = None,
    write: bool = True,
) -> list[str]:
    """:func:`save_pretrained` of a model known by its tensors: ``shapes`` and ``dtypes`` of our state dict (in
    its order), ``load(name)`` giving one tensor at a time (from a live model or a checkpoint, see
    :mod:`framework.interop.hf.stream`). ``dtype`` is the one config.json names. Every check (config fields,
    tensors without a HF counterpart) runs before anything is written. ``write=False``: only call ``load`` for
    each tensor in the same order and write nothing (a rank taking part in the gathers of a sharded save);
    returns ``[]``."""
    config = hf_config_from_spec(spec, dtype=str(dtype).removeprefix("torch."))
    layout = Layout(
        family=spec.family,
        n_experts=_moe_layer_experts(shapes),
        rope_interleave=spec.rope_interleave,
        n_heads=spec.model.n_heads,
        qk_nope_head_dim=spec.model.qk_nope_head_dim,
        qk_rope_head_dim=spec.model.qk_rope_head_dim,
        kv_lora_rank=spec.model.kv_lora_rank,
    )
    rules = rules_for(shapes, layout, spec.model.tie_embeddings)
    shards = group_shards(plan_hf_tensors(rules, shapes, dtypes), max_shard_bytes)
    if not write:
        for rule in rules:
            load(rule.native)
        return []
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_hf_tensors(rules, shards, [out / name for name in names], load)
    written = list(names)
    if len(shards) > 1:
        weight_map = {entry.name: name for name, shard in zip(names, shards) for entry in shard}
        total = sum(entry.nbytes for shard in shards for entry in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(INDEX_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written.insert(0, CONFIG_FILE)
    if tokenizer is not None:
        before = {p.name for p in out.iterdir()}
        tokenizer.save(out)
        written += sorted({p.name for p in out.iterdir()} - before)
    return written
