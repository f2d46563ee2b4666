"""The job built on the meta device for ``N`` ranks: the real model, plugins and parallel code, no weights.

:func:`plan_job_config` types a job for a world size (from a job file, a Hugging Face ``config.json`` alone, or both)
without starting anything; :func:`build_on_meta` builds its model on ``meta``, applies the plugins' transforms and
trainable sets, and runs the project's own parallelisation (tensor → expert → FSDP2/DDP) as rank 0 of a fake process
group of ``N`` ranks, so each parameter's local shard shape comes from the code that trains. The fake group is
destroyed before it returns.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.config import ConfigError, JobConfig, check_world, load_raw
from framework.hooks import PluginManager
from framework.parallel.mesh import ParallelLayout, ParallelMeshes, build_meshes

PLAN_NEUTRAL_HF_FIELDS: dict[str, str] = {
    "quantization_config": "quantization_config ignored: planned as an unquantised model (fp32 master weights)",
    "rope_scaling": "rope_scaling ignored: it changes no tensor shape",
    "auto_map": "auto_map ignored: remote-code class names, no tensor shapes",
}
"""``config.json`` fields the importer refuses (it cannot train them exactly) that change no memory: the planner
drops them and says so."""

FSDP_MESH_DIMS = frozenset({"dp_shard", "efsdp", "dp_replicate", "dp"})
"""Mesh dimension names over which FSDP2 shards (see :func:`framework.parallel.mesh.build_meshes`)."""


class PlanError(ValueError):
    """A job the planner cannot build on meta (one line: what and why)."""


@dataclass
class ParamShard:
    """One parameter as this rank holds it after parallelisation."""

    name: str
    local_numel: int
    """Elements this rank stores (its FSDP / expert / tensor-parallel shard)."""
    gathered_numel: int
    """Elements after FSDP's all-gather (the tensor- and expert-parallel shard: what a forward uses)."""
    element_size: int
    trainable: bool
    unit: str
    """The FSDP2 unit that gathers it: ``layers.<i>``, ``embedding``, ``head`` or ``root`` (see :func:`_fsdp_unit`)."""


@dataclass
class MetaJob:
    """What the planner needs from the built job."""

    config: JobConfig
    layout: ParallelLayout
    accumulation: int
    shards: list[ParamShard]
    total_params: int
    """Unsharded parameter count of the whole model (tied weights once)."""
    moe_shapes: list[dict[str, int]]
    """Per MoE layer: ``num_experts``, ``top_k`` (expert applications per token), ``hidden``, ``shared_hidden``."""
    notes: list[str] = field(default_factory=list)


def _strip_neutral_fields(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    kept = {k: v for k, v in raw.items() if not (k in PLAN_NEUTRAL_HF_FIELDS and v is not None)}
    notes = [PLAN_NEUTRAL_HF_FIELDS[k] for k in raw if k not in kept]
    return kept, notes


@contextlib.contextmanager
def plannable_hf_folder(source: str | Path) -> Iterator[tuple[Path, list[str]]]:
    """A folder holding ``source``'s ``config.json`` (``source`` is the file or its folder) without the fields of
    :data:`PLAN_NEUTRAL_HF_FIELDS`, and the notes saying what was dropped."""
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at '{source}' (give the file or its folder)")
    raw = json.loads(file.read_text(encoding="utf-8"))
    kept, notes = _strip_neutral_fields(raw)
    with tempfile.TemporaryDirectory(prefix="expertrain-plan-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(kept), encoding="utf-8")
        yield Path(tmp), notes


def _raw_plan_job(
    config_path: str | None, overrides: Sequence[str], hf_config: str | None
) -> tuple[dict[str, Any], list[str]]:
    """The raw job with its Hugging Face model sections merged in (as ``expertrain train`` does)."""
    from framework.interop.hf.job import HF_PREFIX, apply_hf_init, hf_folder

    raw = load_raw(config_path, list(overrides))
    model = dict(raw.get("model") or {})
    if hf_config is not None:
        model["init_from"] = f"{HF_PREFIX}{hf_config}"
    source = hf_folder(model.get("init_from"))
    if source is None:
        return raw, []
    with plannable_hf_folder(source) as (folder, notes):
        model["init_from"] = f"{HF_PREFIX}{folder}"
        merged = apply_hf_init({**raw, "model": model})
    merged["model"] = {**merged["model"], "init_from": ""}  # weights are never read: the plan builds on meta
    data = merged.get("data") or {}
    if str(data.get("tokenizer", "")).startswith(str(folder)):
        merged["data"] = {k: v for k, v in data.items() if k != "tokenizer"}
    return merged, notes


def plan_job_config(
    world: int,
    config_path: str | None = None,
    overrides: Sequence[str] = (),
    hf_config: str | None = None,
) -> tuple[JobConfig, PluginManager, ParallelLayout, int, list[str]]:
    """Type the job for ``world`` ranks as the launcher would: ``(config, plugins, layout, accumulation, notes)``."""

    if config_path is None and hf_config is None:
        raise ConfigError(
            "--config", None, "expected a job file (--config F) or a model (--hf-config FOLDER)"
        )
    from framework.train.launch import load_job

    raw, notes = _raw_plan_job(config_path, overrides, hf_config)
    config, pm = load_job(config_path or "--hf-config", overrides, raw, world=world)
    if config.train.engine != "native":
        raise ConfigError(
            "train.engine",
            config.train.engine,
            "expected native: the planner follows DDP/FSDP2 (DeepSpeed ZeRO shards by its own rules)",
        )
    layout = ParallelLayout.from_config(config.parallel, world, config.model, config.moe, config.data.seq_len)
    return config, pm, layout, check_world(config, layout.dp), notes


@contextlib.contextmanager
def fake_process_group(world: int) -> Iterator[None]:
    """Rank 0 of a fake ``world``-rank process group (collectives do nothing), destroyed on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if world == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; plan in a process of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def parallelize_for_plan(
    model: nn.Module, config: JobConfig, meshes: ParallelMeshes, layout: ParallelLayout
) -> nn.Module:
    """The trainer's parallelisation (:func:`framework.parallel.parallelize.parallelize_model`: tensor → expert →
    activation checkpointing → compile → FSDP2) on the meta model. DDP is left out: it shards nothing."""
    from framework.parallel.parallelize import parallelize_model

    parallelize_model(model, config, meshes, torch.device("cpu"))
    return model


def _apply_plugins(model: nn.Module, config: JobConfig, pm: PluginManager) -> None:
    """Plugin transforms and trainable sets on the meta model; a plugin that needs real weights is named."""
    from framework.hooks import PluginHookError
    from framework.train.assembly import transform_and_select

    try:
        transform_and_select(model, config, pm)
    except PluginHookError as exc:
        cause = exc.original
        raise PlanError(
            f"plugin '{exc.plugin}' is not plannable on meta: its model transform needs real weights "
            f"({type(cause).__name__}: {cause}); plan without it and add its adapter memory by hand"
        ) from None


def _moe_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Routed experts, expert applications per token, expert hidden and the layer's other dense hidden (shared
    experts: its parameters besides router and routed experts, read as a SwiGLU of ``3 · dim · hidden``)."""
    shapes = []
    for layer in model.moe_layers():  # type: ignore[attr-defined]
        experts = layer.experts
        routers = {id(p) for r in layer.site_routers() for p in r.parameters()}
        expert_params = {id(p) for p in experts.parameters()}
        other = sum(
            p.numel() for p in layer.parameters() if id(p) not in routers and id(p) not in expert_params
        )
        shapes.append(
            {
                "num_experts": experts.num_experts,
                "top_k": int(getattr(layer, "active_experts_per_token", layer.top_k)),
                "hidden": experts.hidden,
                "shared_hidden": other // (3 * experts.dim),
            }
        )
    return shapes


def _fsdp_unit(name: str, tied: bool) -> str:
    """The FSDP2 unit that all-gathers ``name`` (:func:`framework.parallel.data_parallel.wrap_data_parallel`): its
    block ``layers.<i>`` (a layer's experts are their own unit, gathered inside the block's forward), ``embedding``
    (gathered for its forward and backward only), ``head`` (final norm and LM head: gathered from the head's forward
    to the end of its backward) or ``root`` (a tied embedding and head, model-level parameters: the whole step)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:2])
    if not tied and parts[0] == "tok_embeddings":
        return "embedding"
    if not tied and parts[0] in ("norm", "output"):
        return "head"
    return "root"


def _shard_of(name: str, p: torch.Tensor, unit: str) -> ParamShard:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(p, DTensor):
        return ParamShard(name, p.numel(), p.numel(), p.element_size(), p.requires_grad, unit)
    local = p.to_local().numel()
    gathered = local
    names = p.device_mesh.mesh_dim_names or ()
    for i, placement in enumerate(p.placements):
        # FSDP2 over a mesh that also shards the tensor (tp, ep) places it as a _StridedShard, which torch 2.13
        # does not count as is_shard().
        sharded = placement.is_shard() or isinstance(placement, _StridedShard)
        if sharded and i < len(names) and names[i] in FSDP_MESH_DIMS:
            gathered *= p.device_mesh.size(i)
    return ParamShard(name, local, min(gathered, p.numel()), p.element_size(), p.requires_grad, unit)


def build_on_meta(
    config: JobConfig, pm: PluginManager, layout: ParallelLayout, accumulation: int, notes: list[str]
) -> MetaJob:
    """Build the model on meta, apply the plugins, parallelise it as rank 0 of ``layout.world``; no weights."""
    from framework.models import Transformer

    with torch.device("meta"):
        model = Transformer(config.model, config.moe, pm.registry)
    _apply_plugins(model, config, pm)
    total = model.param_counts()["total"]
    moe_shapes = _moe_shapes(model)
    with fake_process_group(layout.world), warnings.catch_warnings():
        # torch 2.13 warns that slicing a flattened mesh dimension will be deprecated: the trainer's own meshes.
        warnings.filterwarnings("ignore", message="Slicing a flattened dim", category=UserWarning)
        meshes = build_meshes(layout, torch.device("cpu"))
        parallel = parallelize_for_plan(model, config, meshes, layout)
        shards = [
            _shard_of(name, p, _fsdp_unit(name, config.model.tie_embeddings))
            for name, p in parallel.named_parameters()  # tied weights once
        ]
    return MetaJob(config, layout, accumulation, shards, total, moe_shapes, list(notes))
