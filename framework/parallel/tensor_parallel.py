"""Tensor parallelism (Megatron-style, on DTensor) for the dense parts of :class:`~framework.models.Transformer`.

:func:`apply_tensor_parallel` shards attention heads, the dense SwiGLU hidden size and the vocabulary over a 1-D
``tp`` mesh; with ``sequence_parallel`` the norms and the residual stream are split along the sequence instead of
replicated. MoE feed-forward blocks are left to the expert-parallel code (see the function's docstring for the
layout they receive). :func:`check_tensor_parallel` rejects shapes that do not split evenly before anything starts.
See docs/parallelism.md for the placement of every weight and the layout of every activation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from framework.config.errors import ConfigError
from framework.config.sections import ModelConfig
from framework.models.mla import MultiHeadLatentAttention


def check_tensor_parallel(model_cfg: ModelConfig, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    """Raise :class:`ConfigError` unless every tensor-parallel split of the model is even.

    Checked: query heads, key/value heads (``gqa``; ``mla`` has one key/value head per query head, so only
    ``n_heads``), vocabulary (embedding rows and LM-head columns), dense MLP hidden size, and with
    ``sequence_parallel`` the training sequence length. ``dim`` itself is never split (row-parallel outputs are full
    ``dim``), nor are mla's latent ranks and shared RoPE key part (replicated), so they have no constraint beyond the
    ones :meth:`ModelConfig.validate` already makes.
    """
    if tp <= 1:
        return
    if model_cfg.attention == "mla":
        if model_cfg.n_heads % tp:
            raise ConfigError(
                "model.n_heads",
                model_cfg.n_heads,
                f"expected a multiple of parallel.tp={tp} with attention: mla (q_proj / q_b_proj and kv_b_proj are "
                "column-parallel over whole heads: each tensor-parallel rank holds n_heads / tp query, key and "
                "value heads; the latent down projections are replicated); change model.n_heads or parallel.tp",
            )
    elif model_cfg.n_heads % tp:
        raise ConfigError(
            "model.n_heads",
            model_cfg.n_heads,
            f"expected a multiple of parallel.tp={tp} (each tensor-parallel rank holds n_heads / tp query heads); "
            "change model.n_heads or parallel.tp",
        )
    if model_cfg.attention != "mla" and model_cfg.n_kv_heads % tp:
        raise ConfigError(
            "model.n_kv_heads",
            model_cfg.n_kv_heads,
            f"expected a multiple of parallel.tp={tp} (each tensor-parallel rank holds n_kv_heads / tp key/value "
            "heads); raise model.n_kv_heads or lower parallel.tp",
        )
    if model_cfg.vocab_size % tp:
        raise ConfigError(
            "model.vocab_size",
            model_cfg.vocab_size,
            f"expected a multiple of parallel.tp={tp} (the embedding and LM head are vocabulary-parallel); "
            f"pad the vocabulary up to a multiple of {tp} or change parallel.tp",
        )
    if model_cfg.ffn_hidden % tp:
        raise ConfigError(
            "model.ffn_hidden",
            model_cfg.ffn_hidden,
            f"expected a multiple of parallel.tp={tp} (each tensor-parallel rank holds ffn_hidden / tp units of "
            "the dense MLP); change model.ffn_hidden or parallel.tp",
        )
    if sequence_parallel and seq_len % tp:
        raise ConfigError(
            "data.seq_len",
            seq_len,
            f"expected a multiple of parallel.tp={tp} with parallel.sequence_parallel=true (norms and the "
            "residual stream are split along the sequence); change data.seq_len or set "
            "parallel.sequence_parallel=false",
        )


class _ReplicateParallel(ParallelStyle):
    """Replicate a module's parameters (its submodules' too) over the mesh and keep its input and output replicated
    DTensors.

    The non-sequence-parallel counterpart of :class:`SequenceParallel` for the norms: the residual stream stays a
    DTensor (so an MoE block gets a DTensor input either way), which needs the norm weight to be a DTensor too. Also
    mla's replicated latent down projections and norms, which then run as DTensor ops: the gradient coming back from
    the column-parallel up projections is a pending ``Partial`` sum, and so are their weight gradients (reduced by
    the gradient-layout hook or FSDP2).
    """

    def __init__(self, *, use_local_output: bool = False) -> None:
        super().__init__()
        self.use_local_output = use_local_output

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for p_name, param in list(module.named_parameters(recurse=False)):
            # Identical on every rank (deterministic init), so no broadcast is needed.
            dparam = DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False)
            module.register_parameter(p_name, nn.Parameter(dparam, requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_input(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        x = inputs[0]
        if isinstance(x, DTensor):
            if x.placements != (Replicate(),):
                x = x.redistribute(mesh, [Replicate()])
        else:
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        return output.to_local() if self.use_local_output else output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, self._replicate_params, self._prepare_input, self._prepare_output
        )


class _ReplicateInput(ParallelStyle):
    """Give a module its first input as a *replicated* DTensor (attention and the dense MLP read the full sequence).

    Like ``PrepareModuleInput(input_layouts=act, desired_input_layouts=Replicate())`` (Shard(1) -> Replicate is an
    all-gather; the backward reduce-scatters the summed q/k/v or gate/up input gradients once), for any number of
    further arguments, which pass unchanged. Without sequence parallelism the input is also re-wrapped
    (``to_local`` / ``from_local``): the input gradient is then all-reduced here, once, instead of travelling down
    the residual stream as a lazy ``Partial(sum)`` (which would make the row-parallel weight gradients full-size
    partial sums).
    """

    def __init__(self, act: Placement) -> None:
        super().__init__()
        self.act = act

    def _prepare(self, module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [self.act], run_check=False)
        if x.placements != (Replicate(),):
            x = x.redistribute(mesh, [Replicate()])
        else:
            x = DTensor.from_local(x.to_local(), mesh, [Replicate()], run_check=False)
        return (x, *inputs[1:])

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(lambda mod, inputs: self._prepare(mod, inputs, device_mesh))
        return module


def _place_declared_params(
    module: nn.Module, mesh: DeviceMesh, style: str, src_data_rank: int | None
) -> None:
    """Distribute the parameters a linear layer holds besides ``weight`` / ``bias`` (e.g. a LoRA adapter's), as
    the layer declares with ``tensor_parallel_placements(style) -> {dotted name: placement}``; a parameter left
    undeclared is an error naming it."""
    declare = getattr(module, "tensor_parallel_placements", None)
    placements: dict[str, Placement] = declare(style) if declare is not None else {}
    for name, placement in placements.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        param = getattr(owner, leaf)
        value = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=src_data_rank)
        owner.register_parameter(leaf, nn.Parameter(value, requires_grad=param.requires_grad))
    plain = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise ValueError(
            f"{type(module).__name__} has parameters {plain} that the {style} tensor-parallel plan does not place; "
            "declare them with tensor_parallel_placements(style)"
        )


class _ColwiseLinear(ColwiseParallel):
    """``ColwiseParallel`` that shards only the layer's own ``weight`` / ``bias`` (``Shard(0)``) and places any
    further parameters (adapters) as the layer declares (:func:`_place_declared_params`)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:  # called for every submodule; the layer itself places its children's parameters
            return
        for p_name, param in list(module.named_parameters(recurse=False)):
            if p_name in ("weight", "bias"):
                value = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                module.register_parameter(p_name, nn.Parameter(value, requires_grad=param.requires_grad))
        _place_declared_params(module, device_mesh, "colwise", self.src_data_rank)


class _RowwiseLinear(RowwiseParallel):
    """``RowwiseParallel`` (``weight`` ``Shard(1)``, ``bias`` replicated) that also places further parameters
    (adapters) as the layer declares (:func:`_place_declared_params`)."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:
            return
        super()._partition_linear_fn(name, module, device_mesh)
        _place_declared_params(module, device_mesh, "rowwise", self.src_data_rank)


def _norm_style(sequence_parallel: bool, use_local_output: bool = False) -> ParallelStyle:
    if sequence_parallel:
        return SequenceParallel(use_local_output=use_local_output)
    return _ReplicateParallel(use_local_output=use_local_output)


def _keep_grad_layout(param: torch.Tensor) -> None:
    """After each gradient accumulation, give ``param.grad`` the parameter's own placement.

    DTensor autograd leaves some gradients in another layout than their parameter: a pending ``Partial`` sum for
    replicated norm weights under sequence parallelism (the sum over the sequence shards is a real reduction), and a
    full ``Replicate`` table for the vocabulary-parallel embedding (DTensor's embedding-backward rule). An optimizer
    or clipping would then reduce lazily, once per use. Redistributing here costs one all-reduce of the (small)
    norm weight, or a local slice of the embedding gradient, which is then copied so the full table is freed.
    FSDP2 replaces the parameters when it shards them, so these hooks only act when TP is not wrapped by FSDP2
    (which fixes the layout itself before its reduce-scatter).
    """

    def hook(p: torch.Tensor) -> None:
        grad = p.grad
        if not isinstance(grad, DTensor) or grad.placements == p.placements:
            return
        grad = grad.redistribute(p.device_mesh, p.placements)
        local = grad.to_local()
        if local.untyped_storage().nbytes() > local.numel() * local.element_size():
            grad = DTensor.from_local(
                local.clone(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
            )
        p.grad = grad

    param.register_post_accumulate_grad_hook(hook)


def _replicate_head_norms(attention: nn.Module, mesh: DeviceMesh) -> None:
    """Make the per-head q/k norm weights (``model.qk_norm``) replicated DTensors on ``mesh``.

    Every rank normalises its own heads with the same weight, so the weight's true gradient is the sum over the
    ranks; the attention reads it through ``local_weight``, which marks that gradient a pending sum, and the
    gradient-layout hook (or FSDP2) reduces it.
    """
    for name in ("q_norm", "k_norm"):
        norm = getattr(attention, name, None)
        if norm is not None:
            _ReplicateParallel._replicate_params(name, norm, mesh)


_GQA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _mla_names(attention: MultiHeadLatentAttention) -> tuple[str, ...]:
    query = ("q_a_proj", "q_b_proj") if attention.q_lora_rank else ("q_proj",)
    return (*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _check_plan_targets(model: nn.Module) -> None:
    """Fail with a clear message when a plugin swapped a module this plan addresses by name."""
    for i, block in enumerate(model.layers):
        attention = block.attention
        names = _mla_names(attention) if isinstance(attention, MultiHeadLatentAttention) else _GQA_NAMES
        if not all(isinstance(getattr(attention, n, None), nn.Linear) for n in names):
            raise ValueError(
                f"layers.{i}.attention ({type(attention).__name__}) has no nn.Linear {'/'.join(names)}; tensor "
                "parallelism supports the built-in 'gqa' and 'mla' attention layouts only"
            )


def _attention_plan(attention: nn.Module, act: Placement) -> dict[str, ParallelStyle]:
    """The plan of one block's attention, by component (keys relative to the block).

    gqa: ``q/k/v_proj`` column-parallel, ``o_proj`` row-parallel. mla (Megatron / DeepSeek): the latent down
    projections ``q_a_proj`` and ``kv_a_proj_with_mqa`` (whose output includes the shared RoPE key part) and their
    norms replicated, computed whole on the full sequence by every rank; the up projections ``q_proj`` / ``q_b_proj``
    and ``kv_b_proj`` column-parallel over whole heads; ``o_proj`` row-parallel.
    """
    plan: dict[str, ParallelStyle] = {
        # (x, cos, sin, position_ids, ...): x gathered to the full sequence; RoPE tables and ids pass unchanged.
        "attention": _ReplicateInput(act),
    }
    if isinstance(attention, MultiHeadLatentAttention):
        if attention.q_lora_rank:
            plan["attention.q_a_proj"] = _ReplicateParallel()
            plan["attention.q_a_layernorm"] = _ReplicateParallel()
            plan["attention.q_b_proj"] = _ColwiseLinear()
        else:
            plan["attention.q_proj"] = _ColwiseLinear()
        plan["attention.kv_a_proj_with_mqa"] = _ReplicateParallel()
        plan["attention.kv_a_layernorm"] = _ReplicateParallel()
        plan["attention.kv_b_proj"] = _ColwiseLinear()
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"attention.{name}"] = _ColwiseLinear()
    plan["attention.o_proj"] = _RowwiseLinear(output_layouts=act, use_local_output=False)
    return plan


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, *, shard_logits: bool = True
) -> None:
    """Shard the dense parts of ``model`` (a :class:`~framework.models.Transformer`) over the 1-D ``tp_mesh``.

    Call after the full model is initialised (identically on every rank: parameters are wrapped, not broadcast) and
    before FSDP2 ``fully_shard`` over the data-parallel mesh dimension. Parameters become DTensors on ``tp_mesh``
    (see docs/parallelism.md for the table):

    - ``tok_embeddings``: vocabulary-parallel (weight ``Shard(0)``); ids are replicated.
    - per block: ``attention_norm`` / ``ffn_norm`` replicated weights; ``q/k/v_proj`` column-parallel
      (``Shard(0)``: whole heads per rank, a q/k/v bias sharded with its rows), ``o_proj`` row-parallel
      (``Shard(1)``, its bias replicated); q/k head norms (``model.qk_norm``) replicated; dense ``gate/up_proj``
      column-parallel, ``down_proj`` row-parallel.
    - mla attention instead: ``q_a_proj``, ``kv_a_proj_with_mqa`` and the latent norms replicated (computed whole,
      on the full sequence, by every rank; the shared RoPE key part with them); ``q_proj`` / ``q_b_proj`` and
      ``kv_b_proj`` column-parallel over whole heads; ``o_proj`` row-parallel.
    - parameters a linear layer holds besides ``weight`` / ``bias`` (a LoRA adapter's ``lora_A`` / ``lora_B``) are
      placed as the layer declares with ``tensor_parallel_placements("colwise" | "rowwise")``.
    - ``norm`` replicated; ``output`` column-parallel (vocabulary, ``Shard(0)``). Tied embeddings stay tied: the
      embedding and the head share one ``Shard(0)`` DTensor parameter.

    Activations: the residual stream between modules is a DTensor ``[B, S, D]`` with placement ``Shard(1)``
    (sequence-parallel) or ``Replicate()``; attention and the dense MLP gather it to the full sequence on entry,
    compute on plain local tensors holding their own heads / hidden slice, and reduce(-scatter) back to that
    placement on exit. Gradients come back in their parameter's placement (a hook reduces the sequence-parallel
    norm weights' partial sums).

    MoE blocks (``block.is_moe``) are not touched: ``block.ffn`` receives the ``ffn_norm`` output unchanged, a
    DTensor ``[B, S, D]`` on ``tp_mesh`` placed ``Shard(1)`` when ``sequence_parallel`` (this rank's sequence
    slice) else ``Replicate()`` (the full sequence, identical on every tp rank), and must return a DTensor of the
    same shape, mesh and placement (it is added to the residual stream). Its own parameters stay as they are.

    Logits: with ``shard_logits`` (the default) ``model(...)`` returns a DTensor ``[B, S, V]`` placed
    ``Shard(-1)`` (vocabulary-parallel) for :func:`framework.train.loss.lm_loss_sum`, which computes the loss
    under ``loss_parallel`` without gathering the vocabulary; with ``shard_logits=False`` the logits are gathered
    and returned as a plain, full, replicated tensor (e.g. for plugins that read the logits).
    """
    _check_plan_targets(model)
    tied = model.output.weight is model.tok_embeddings.weight
    # Some styles (torch's SequenceParallel) make new Parameters that require grad: keep frozen weights frozen.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    act: Placement = Shard(1) if sequence_parallel else Replicate()

    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
            # Local output into the head's ColwiseParallel (which re-wraps it): its backward then reduces the
            # head's input gradient to ``act`` (all-reduce, or reduce-scatter with SP) instead of sending a lazy
            # Partial(sum) down the residual stream, where it would make the row-parallel weight gradients full-size
            # partial sums.
            "norm": _norm_style(sequence_parallel, use_local_output=True),
            "output": _ColwiseLinear(
                input_layouts=act,
                output_layouts=Shard(-1) if shard_logits else Replicate(),
                use_local_output=not shard_logits,
            ),
        },
    )
    # The residual stream is a DTensor. Re-wrapping the embedding's local output (instead of keeping its DTensor)
    # makes the backward reduce the incoming gradient to ``act`` first (free when it already is): a lazy
    # Partial(sum) gradient, as an MoE block's backward may leave, would otherwise reach the vocabulary-parallel
    # embedding's MaskPartial backward, which refuses it ("Redistribution from P(sum) to MaskP is unsupported").
    parallelize_module(
        model.tok_embeddings,
        tp_mesh,
        PrepareModuleOutput(output_layouts=act, desired_output_layouts=act, use_local_output=False),
    )
    for block in model.layers:
        plan: dict[str, ParallelStyle] = {
            "attention_norm": _norm_style(sequence_parallel),
            **_attention_plan(block.attention, act),
            "ffn_norm": _norm_style(sequence_parallel),
        }
        if not block.is_moe:
            plan.update(
                {
                    "ffn": _ReplicateInput(act),
                    "ffn.gate_proj": _ColwiseLinear(),
                    "ffn.up_proj": _ColwiseLinear(),
                    "ffn.down_proj": _RowwiseLinear(output_layouts=act, use_local_output=False),
                }
            )
        parallelize_module(block, tp_mesh, plan)
        _replicate_head_norms(block.attention, tp_mesh)

    if tied:
        # Both styles shard the vocabulary rows (Shard(0)) but each made its own parameter: share the embedding's.
        if model.output.weight.placements != model.tok_embeddings.weight.placements:
            raise AssertionError("tied embedding and LM head got different placements")
        model.output.weight = model.tok_embeddings.weight
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    moe_params = {id(p) for block in model.layers if block.is_moe for p in block.ffn.parameters()}
    for param in model.parameters():
        if (
            isinstance(param, DTensor) and param.requires_grad and id(param) not in moe_params
        ):  # frozen: no grad
            _keep_grad_layout(param)
