"""Model assembly: from a typed job to this rank's share of the model, ready for an optimizer.

The order (torchtitan's: meta init → parallelize → materialise local shards → init → load)::

    build on meta ─ plugin transforms (structure) ─ trainable set ─ parallelise on meta (TP → EP/ETP → activation
    checkpointing → compile → FSDP2) ─ allocate this rank's shards ─ keyed init ─ load model.init_from (local
    slices only) ─ plugin init (expertrain_init_weights) ─ DDP wrap

so no rank ever holds more than its shards (plus one tensor being converted while loading). Every parameter gets the
values it would have on one rank, whatever the layout (:mod:`framework.models.init`).

Two cases keep the old order, where every rank first materialises the whole model (initialised, ``init_from``
loaded), then transforms and parallelises it: a plugin whose transform needs real weights
(:meth:`~framework.hooks.PluginManager.transforms_needing_weights`), and the DeepSpeed engine (its expert slices are
plain tensors, and it shards the rest itself). The log says which applies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from framework.comm import collectives as C
from framework.config import JobConfig
from framework.hooks import PluginManager
from framework.models import Transformer
from framework.models.init import KeyedInit
from framework.observe import console
from framework.parallel.mesh import ParallelMeshes
from framework.parallel.parallelize import parallelize_model, wrap_replicated


@dataclass
class AssembledModel:
    raw: Transformer
    """The user's module (hooks receive it; FSDP2 shards it in place)."""
    model: nn.Module
    """What the engine trains: ``raw``, or the DDP wrapper around it."""
    param_counts: dict[str, int]
    """Of the whole model (see :meth:`Transformer.param_counts`), counted before sharding."""
    flops_per_token: float
    whole_on_every_rank: str | None
    """Why every rank materialised the whole model before sharding, or ``None`` when it allocated only its shards."""
    init_bytes_read: int | None = None
    """Bytes of tensor data this rank read from a Hugging Face ``model.init_from`` folder (``None``: none read)."""


def assemble_model(
    config: JobConfig,
    pm: PluginManager,
    meshes: ParallelMeshes,
    device: torch.device,
    *,
    resuming: bool,
    quiet: bool = False,
) -> AssembledModel:
    """Build, transform, parallelise and initialise the job's model on this rank (collective: every rank calls it).
    ``resuming``: a checkpoint will overwrite the weights, so ``model.init_from`` is not read. ``quiet``: no log line
    about how the model was built."""
    with torch.device("meta"):
        model = Transformer(config.model, config.moe, pm.registry)
    base_keys = set(model.state_dict())
    read: list[int] = []
    whole = _why_whole(config, pm)
    if whole is not None:
        if not quiet:
            console.info(f"building the whole model on every rank before sharding: {whole}")
        model.to_empty(device=device)
        _init_base(model, config, base_keys, resuming, read)
    transform_and_select(model, config, pm)
    if whole is not None:
        pm.hook.expertrain_init_weights(
            model=model, config=config, init=KeyedInit.for_model(config.train.seed, model), resumed=resuming
        )
    counts = model.param_counts()
    flops = model.flops_per_token(config.data.seq_len)
    parallelize_model(model, config, meshes, device)
    if whole is None:
        # FSDP2's CPU offload keeps the sharded parameters (and so the optimizer state) on the host; buffers (RoPE
        # tables, router biases) are not FSDP's and stay on the compute device.
        model.to_empty(device="cpu" if config.parallel.cpu_offload else device)
        if config.parallel.cpu_offload:
            for module in model.modules():
                for name, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[name] = buf.to(device)
        _init_base(model, config, base_keys, resuming, read)
        pm.hook.expertrain_init_weights(
            model=model, config=config, init=KeyedInit.for_model(config.train.seed, model), resumed=resuming
        )
    replicated = wrap_replicated(model, config, meshes, device)
    return AssembledModel(model, replicated, counts, flops, whole, sum(read) if read else None)


def transform_and_select(model: nn.Module, config: JobConfig, pm: PluginManager) -> None:
    """The plugins' transforms (``expertrain_transform_model``), then the trainable set: ``requires_grad`` from
    ``expertrain_trainable_parameters``. On the meta device when no plugin needs real weights."""
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def assemble_single_process(config: JobConfig, pm: PluginManager) -> AssembledModel:
    """The job's model whole in this process on the CPU (exports, inference), whatever layout it trained with: the
    parallel section reset to one rank, no compile or activation checkpointing; ``model.init_from`` is not read (a
    checkpoint is loaded over the result)."""
    from framework.config.sections import ParallelConfig
    from framework.parallel.mesh import ParallelLayout, build_meshes

    train = dataclasses.replace(config.train, compile=False, activation_checkpointing=False, engine="native")
    one = dataclasses.replace(config, parallel=ParallelConfig(), train=train)
    layout = ParallelLayout.from_config(one.parallel, 1, one.model, one.moe, one.data.seq_len)
    cpu = torch.device("cpu")
    return assemble_model(one, pm, build_meshes(layout, cpu), cpu, resuming=True, quiet=True)


def _why_whole(config: JobConfig, pm: PluginManager) -> str | None:
    if config.train.engine == "deepspeed":
        return "the DeepSpeed engine partitions a built model"
    needing = pm.transforms_needing_weights()
    if needing:
        return f"plugin(s) {', '.join(needing)} transform real weights (they implement no expertrain_init_weights)"
    return None


@torch.no_grad()
def _init_base(
    model: Transformer, config: JobConfig, base_keys: set[str], resuming: bool, read: list[int]
) -> None:
    """Keyed init of every core parameter and buffer (RoPE tables, tied weights), then ``model.init_from`` into the
    base tensors (this rank's slices of them)."""
    model.init_weights(KeyedInit.for_model(config.train.seed, model))
    if config.model.init_from and not resuming:
        from framework.checkpoint.warm_start import load_model_weights

        source = C.run_agreed(
            "loading model.init_from",
            lambda: load_model_weights(config.model.init_from, model, keys=base_keys, read=read),
        )
        detail = f" ({read[0] / 2**20:,.0f} MiB of tensor data read on rank 0)" if read else ""
        console.info(f"model weights from {source}{detail}")


def describe(assembled: AssembledModel) -> str:
    """The one-line model summary the trainer logs."""
    counts = assembled.param_counts
    n_train = sum(p.numel() for p in assembled.raw.parameters() if p.requires_grad)
    return (
        f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active_per_token'] / 1e6:.2f}M active per token, "
        f"{n_train / 1e6:.2f}M trainable; {assembled.flops_per_token / 1e6:.1f} MFLOPs per token (train)"
    )
