"""Hook specifications: the whole extension surface of expertrain.

Grouped by lifecycle, in the order they fire. Every hook fires on every rank; a collective inside a hook must run on
all ranks. Unless a hook says otherwise, results of all plugins are collected in a list (pluggy's default) and the core
merges them as described. Hook arguments are passed by name: an implementation declares any subset of them, in any
order, as ordinary parameters (not keyword-only). Every hook that passes ``model`` passes the user's module (under DDP
the module inside the wrapper, never the wrapper). Plugins are called in plugin order: plugins the core enabled
itself first, then the job's ``plugins`` list in order. An exception inside a hook stops the run as a
:class:`framework.hooks.PluginHookError` naming the plugin and the hook (a ``ConfigError`` stays a ``ConfigError``).

Lifecycle of one job::

    expertrain_config_sections ─ expertrain_register_components ─ expertrain_validate_config
    build model (meta) ─ expertrain_transform_model ─ expertrain_trainable_parameters ─ parallelize
    ─ materialise local shards, init, load model.init_from ─ expertrain_init_weights
    ─ expertrain_after_parallelize ─ expertrain_optimizer_param_groups ─ expertrain_after_optimizer
    per step: expertrain_step_begin ─ (forward: expertrain_extra_losses) ─ expertrain_after_backward
              ─ optimizer.step ─ expertrain_after_optimizer_step ─ expertrain_metrics
    checkpoints: expertrain_state_dict / expertrain_load_state_dict
    expertrain_export ─ expertrain_train_end
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.hooks.markers import hookspec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from framework.config import JobConfig
    from framework.hooks.registry import ComponentRegistry


# --- registration -----------------------------------------------------------------------------------------------


@hookspec
def expertrain_config_sections() -> dict[str, type] | None:
    """Declare the plugin's top-level config sections.

    When: once, right after the plugin is loaded, before the job file is typed.
    May change: nothing.
    Returns: a mapping ``{section_name: dataclass}``; fields are declared with :func:`framework.config.option` so they
    are typed, validated and documented like core fields. A section name claimed by two plugins, or by a plugin and
    the core, is an error naming both. ``None`` when the plugin has no section.
    """


@hookspec
def expertrain_register_components(registry: ComponentRegistry) -> None:
    """Register named components: MoE blocks, routers, attention variants, PEFT methods.

    When: once, after config sections are known and before the config is validated.
    May change: ``registry`` only, through ``registry.register(kind, name, factory)``. Registering a name that
    another plugin already registered is an error naming both plugins.
    Returns: nothing.
    """


@hookspec
def expertrain_validate_config(config: JobConfig, world_size: int) -> None:
    """Check the plugin's section against the rest of the job and the world size.

    When: once, after the whole config is typed, before anything is built. Fires on every rank.
    May change: nothing.
    Returns: nothing; raise :class:`framework.config.ConfigError` naming the key to reject the job (it propagates as
    a ``ConfigError``, with the plugin's name added to its message).
    """


# --- build ------------------------------------------------------------------------------------------------------


@hookspec
def expertrain_transform_model(model: nn.Module, config: JobConfig) -> None:
    """Transform the freshly built model in place (inject adapters, swap modules).

    When: after the model is built, before the trainable set is decided, before parallelisation and before the
    optimizer exists. Plugins run in the order they are listed in ``plugins``. Where the model is then:

    - on the **meta device** (no values, nothing allocated) when every plugin that transforms the model also
      implements :func:`expertrain_init_weights`: such a plugin changes structure here and sets its parameters' values
      there. The model is parallelised on meta and each rank then allocates only its shards: what a model larger than
      one device needs;
    - with **real, whole weights** (initialised, ``model.init_from`` loaded) on every rank otherwise: a plugin whose
      transform reads weights (e.g. an SVD of the base) and has no ``expertrain_init_weights`` gets them, at the cost
      of every rank holding the whole model until it is sharded (the job's log says which plugin caused it).

    May change: the model's modules and parameters (new parameters on the model's device, meta included).
    Returns: nothing.
    """


@hookspec
def expertrain_init_weights(model: nn.Module, config: JobConfig, init: Any, resumed: bool) -> None:
    """Set the values of the parameters this plugin added (adapters, gates), on this rank's shards.

    When: once the model's parameters exist on this rank: after parallelisation, materialisation of the local
    shards, the core's initialisation and the load of ``model.init_from`` into the base weights (so base values are
    final here), before ``expertrain_after_parallelize``. Also on resume, before the checkpoint overwrites the values.
    Implementing this hook declares that the plugin's ``expertrain_transform_model`` only changes structure (see
    there). Parameters may be DTensor shards: fill them with :func:`framework.models.init.normal_` /
    :func:`~framework.models.init.uniform_` passing ``init`` (a :class:`framework.models.init.KeyedInit`), which
    gives every element the value it has on one rank, whatever the layout; a plugin with a seed of its own builds
    ``KeyedInit(seed, model.named_parameters())``. Constant fills (``zero_()``, ``fill_()``) work on shards as they are.
    ``resumed`` is true when a checkpoint is about to overwrite every value this hook sets (costly decompositions may
    be skipped then, provided nothing before the checkpoint load reads them).
    May change: values of the plugin's own parameters and buffers, in place.
    Returns: nothing.
    """


@hookspec
def expertrain_trainable_parameters(model: nn.Module, config: JobConfig) -> list[str] | None:
    """Name the parameters this plugin wants trained.

    When: after every ``expertrain_transform_model``.
    May change: nothing (the core sets ``requires_grad``).
    Returns: parameter names (as in ``model.named_parameters()``), or ``None`` for no opinion. If any plugin returns
    a list, the union of all lists is trained and every other parameter is frozen (no gradient, no optimizer state);
    if all return ``None`` every parameter is trained. A name that does not exist is an error naming the plugin, and
    so is a union that is empty (nothing would be trained).
    """


@hookspec
def expertrain_after_parallelize(model: nn.Module, config: JobConfig, resumed: bool) -> None:
    """Data-dependent initialisation on the final (possibly sharded) model, e.g. calibration.

    ``model`` is the user's module with its parameter names unchanged: FSDP2 shards it in place, and under DDP the
    hook gets the module inside the wrapper, never the wrapper.

    When: after data-parallel wrapping, before the optimizer is built. ``resumed`` is true when the weights are
    about to be replaced by a checkpoint (skip expensive work then).
    May change: parameter values in place (every rank must compute the same values).
    Returns: nothing.
    """


@hookspec
def expertrain_optimizer_param_groups(model: nn.Module, config: JobConfig) -> list[dict[str, Any]] | None:
    """Claim trainable parameters for optimizer groups with their own settings (lr, weight decay, ...).

    When: once, when the optimizer is built.
    May change: nothing.
    Returns: a list of torch param-group dicts whose ``params`` are trainable parameters of ``model``, or ``None``.
    The core tags each group with ``"plugin": <name>``. A parameter claimed by two groups, a tensor that is not a
    parameter of ``model`` and a frozen parameter are errors; unclaimed trainable parameters go to the core's default
    groups (decay for matrices, no decay for norms and biases).
    """


@hookspec
def expertrain_after_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, config: JobConfig) -> None:
    """See the optimizer once it exists (e.g. to keep a handle for masking its state).

    When: right after the optimizer and scheduler are built, before a checkpoint is loaded into them.
    May change: the optimizer's settings, not its parameter list.
    Returns: nothing.
    """


# --- step -------------------------------------------------------------------------------------------------------


@hookspec
def expertrain_step_begin(
    step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: JobConfig
) -> None:
    """A new optimizer step is about to run its first micro-batch.

    When: before the forward of the first micro-batch of step ``step`` (1-based).
    May change: parameter values, masks, the trainable set's optimizer state (e.g. refresh a sparse mask).
    Returns: nothing.
    """


@hookspec
def expertrain_extra_losses(
    model: nn.Module, input_ids: torch.Tensor, logits: torch.Tensor, config: JobConfig
) -> dict[str, torch.Tensor] | None:
    """Add named loss terms to a micro-batch's objective.

    When: after each micro-batch forward, before backward.
    Arguments: ``logits`` are the fp32 logits ``[B, S, V]`` of every position. Declare ``logits`` only when the
    loss needs them: declaring the argument is the option that asks for them. While no implementation takes them
    (:meth:`framework.hooks.PluginManager.hook_argument_takers` answers which do), the trainer runs the LM head only
    at the positions that carry a label (much cheaper for SFT batches, whose prompts carry none) and passes
    ``logits=None``.
    May change: nothing.
    Returns: ``{name: scalar tensor}`` already weighted by the plugin's coefficient, or ``None``. Each term is added
    to the language-model loss (scaled for gradient accumulation like it) and logged as ``loss/<name>``. A name
    returned by two plugins, or a value that is not a scalar tensor, is an error.
    """


@hookspec
def expertrain_after_backward(step: int, model: nn.Module, config: JobConfig) -> None:
    """Gradients of the step are complete (all micro-batches, reduced across data-parallel ranks).

    When: after the last backward of step ``step``, before gradient clipping and the optimizer step.
    May change: gradients in place (masking, noise).
    Returns: nothing.
    """


@hookspec
def expertrain_after_optimizer_step(
    step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: JobConfig
) -> None:
    """The optimizer has updated the parameters of step ``step``.

    When: after ``optimizer.step()`` and the scheduler step, before metrics.
    May change: parameter values and buffers (e.g. restore frozen slices, update routing biases).
    Returns: nothing.
    """


@hookspec
def expertrain_metrics(step: int, model: nn.Module, config: JobConfig) -> dict[str, float] | None:
    """Report metrics for step ``step``.

    When: on logging steps, after ``expertrain_after_optimizer_step``.
    May change: nothing.
    Returns: ``{name: number}`` (0-d tensors accepted) merged into the step's metrics line (``metrics.jsonl``,
    TensorBoard); ``None`` for nothing. Names should be prefixed with the plugin name; a name returned by two plugins
    is an error.
    """


# --- state ------------------------------------------------------------------------------------------------------


@hookspec
def expertrain_state_dict(model: nn.Module, config: JobConfig) -> dict[str, Any] | None:
    """State the plugin needs to resume exactly (masks, stage seeds, counters), saved with each checkpoint.

    When: at each checkpoint save, on every rank.
    May change: nothing.
    Returns: a mapping of tensors and plain values (str, int, float, bool, lists), or ``None``. It is stored under
    the plugin's name; tensors must be identical on every rank or be plain per-rank tensors of a fixed layout.
    """


@hookspec
def expertrain_load_state_dict(model: nn.Module, state: dict[str, Any], config: JobConfig) -> None:
    """Restore what ``expertrain_state_dict`` returned.

    When: on resume, after model and optimizer state are loaded. Called only for plugins that saved state; state of
    a plugin the job does not enable, or of one without this hook, is an error.
    May change: the plugin's own state, parameter values.
    Returns: nothing.
    """


@hookspec
def expertrain_export_tensors(model: nn.Module, config: JobConfig, export_format: str) -> list[str] | None:
    """Name the frozen base tensors the plugin's export reads, so a streamed export loads them.

    When: during ``expertrain export``, in one process, on the job's model built and transformed on the ``meta``
    device, before any value is loaded. An export loads from the checkpoint only the tensors plugins added, the
    trainable parameters and the names returned here; every other base weight stays on ``meta``, and an
    ``expertrain_export`` or ``expertrain_merge_tensor`` that reads one is an error naming this hook.
    ``export_format``: the format being written (``hf`` for ``export hf --merge``).
    May change: nothing.
    Returns: state-dict names of the model, or ``None`` when the plugin's export reads no base weight.
    """


@hookspec
def expertrain_export(
    model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
) -> list[str] | None:
    """Write the plugin's artefacts for ``expertrain export <format>`` (e.g. a peft adapter).

    When: during an export, in one process, on the job's model with the plugins' own tensors, the trainable ones
    and those named by ``expertrain_export_tensors`` loaded from the checkpoint (frozen base weights on ``meta``). For
    ``native`` after the core wrote its own files; for any other format the core writes only ``export.json``, and a
    format that no plugin answers is an error ("no plugin of its job provides it").
    May change: nothing in the model.
    Returns: the file names the plugin wrote in ``output_dir``, or ``None`` if the format is not the plugin's.
    """


@hookspec
def expertrain_merge_tensor(
    model: nn.Module, config: JobConfig, name: str, tensor: torch.Tensor
) -> torch.Tensor | None:
    """Fold the plugin's adapters into one base tensor of a merged export (the streamed ``--merge``).

    When: ``expertrain export hf --merge``, once per tensor of the job's model without plugin transforms, in
    state-dict order, in one process; ``tensor`` is that tensor's trained value (whole, on the CPU) and ``name``
    its state-dict name. ``model`` is the job's model with only the tensors plugins added and the trainable ones
    loaded (frozen base weights on ``meta``, see ``expertrain_export_tensors``). Used when every plugin that
    changes the model implements it; otherwise the whole model is rebuilt and ``expertrain_merge_adapters`` runs.
    May change: ``tensor`` (in place), nothing in the model.
    Returns: the merged tensor (``tensor`` itself, or a new one of its dtype and shape), or ``None`` when the plugin
    adapts nothing of ``name``. Must give the bytes ``expertrain_merge_adapters`` gives for that tensor.
    """


@hookspec
def expertrain_merge_adapters(model: nn.Module, config: JobConfig) -> list[str] | None:
    """Fold the plugin's adapters into the base weights and take the adapter modules out, leaving a plain model.

    When: ``expertrain export hf --merge``, in one process, with the model rebuilt from the checkpoint and the job's
    plugins, before the Hugging Face folder is written.
    May change: the model's weights and modules (the result must hold only the base model's tensors).
    Returns: the names of the modules merged, or ``None`` if the plugin adds nothing to merge. A plugin whose
    adapters cannot be merged (their output depends on the input, as MoLA's routed experts or Compacter's
    nonlinear adapters) raises :class:`~framework.hooks.PluginError` saying so and which export to use instead.
    """


@hookspec
def expertrain_train_end(model: nn.Module, summary: dict[str, Any], config: JobConfig) -> None:
    """The run finished its last step (after the final checkpoint and evaluation).

    When: once, on every rank, before the summary is printed.
    May change: ``summary`` (add lines the user should see).
    Returns: nothing.
    """
