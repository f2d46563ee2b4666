"""DeepSpeed ZeRO 0-3 around the job's own model, torch AdamW, schedule, accumulation and clipping
(``train.engine: deepspeed``; docs/deepspeed.md).

What stays the job's: the model (built, initialised and transformed exactly as for the native engine), the torch
AdamW and its param groups (passed to ``deepspeed.initialize(optimizer=...)``; ZeRO shards its state), the warmup +
cosine schedule (stepped by the trainer on the same param-group dicts, so the lr is identical), the loss scaling, and
autocast for ``train.dtype: bf16`` (DeepSpeed keeps fp32 weights and gradients). What DeepSpeed does: gradient
reduction (averaged over the data-parallel ranks like DDP/FSDP), optimizer-state / gradient / parameter
partitioning, clipping to ``optim.grad_clip`` and the step.

Gradients equal the native engine's: the trainer's objective is already divided by the accumulation steps and
scaled by ``dp / global tokens``, so ``engine.backward`` runs with ``scale_wrt_gas=False`` and the accumulation
boundary is set explicitly on every micro-batch.

Expert parallelism (``parallel.ep > 1``, ZeRO 0-2): the expert weights are this rank's plain ``[E / ep, ...]`` slices
(:func:`framework.parallel.expert_parallel.apply_expert_parallel` with ``as_dtensor=False``). DeepSpeed recognises
only its own MoE class, so the wiring is deliberate: :func:`mark_expert_params` gives those weights DeepSpeed's
expert attributes (``allreduce=False``, ``group_name``), ``framework.train.optim.split_expert_groups`` puts them in
param groups of their own (``moe: True``), and a parameter-less marker module (a subclass of DeepSpeed's ``MoE``)
makes the engine create its expert and expert-data-parallel groups, which are checked against the job's ``ep``
mesh. Their gradients are then summed over the ranks holding the same experts and divided by the data-parallel size,
as for every other weight.

Checkpoints go through the same store as the native engine, as full (gathered) parameter-name keyed tensors in the
format of ``get_state_dict`` (expert slices as DTensors sharded over ``ep``), so a run resumes under either engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from framework.config import ConfigError, JobConfig
from framework.engines import StateDicts

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
"""torch AdamW's per-parameter state tensors (besides ``step``)."""


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of ``ep_size`` (``ep_size_{n}``)."""
    return f"ep_size_{ep_size}"


def expert_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights that expert parallelism cut to per-rank slices: ``experts.*`` of every MoE layer whose
    dispatcher exchanges tokens (layers left local by :func:`apply_expert_parallel` are not included)."""
    from framework.models.moe.dispatch import LocalDispatcher

    params: list[nn.Parameter] = []
    for layer in model.moe_layers():  # type: ignore[attr-defined]
        experts = getattr(layer, "experts", None)
        if experts is None or isinstance(getattr(layer, "dispatcher", None), LocalDispatcher):
            continue
        params.extend(experts.parameters())
    return params


def mark_expert_params(params: list[nn.Parameter], ep_size: int) -> None:
    """Give expert-parallel weights the attributes DeepSpeed reads (``deepspeed.moe.utils.is_moe_param``): their
    gradients are then reduced over the expert-data-parallel group ``ep_size_{ep_size}`` only. Call before the
    optimizer is built (its param groups split on these attributes)."""
    for p in params:
        if isinstance(p, DTensor):
            raise ValueError(
                "expert weights are DTensors: apply expert parallelism with as_dtensor=False for DeepSpeed"
            )
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = expert_group_name(ep_size)  # type: ignore[attr-defined]


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def import_deepspeed(device: torch.device) -> Any:
    """``import deepspeed`` on the job's device kind, with its INFO chatter off; a clear error when it is missing."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "train.engine",
            "deepspeed",
            f"expected the deepspeed package ({exc}); install the extra: pip install -e '.[deepspeed]'",
        ) from None
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        # On CPU ranks DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce at start-up (~30 s
        # with a C++ toolchain, an error without one). gloo performs the same reductions; DeepSpeed documents this
        # dict as editable, and an op marked incompatible is simply not built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _expert_groups_marker(ep_size: int, num_experts: int) -> nn.Module:
    """A parameter-less module DeepSpeed takes for one of its MoE layers: the engine then switches on its MoE paths
    (expert param groups in ZeRO, expert gradient reduction) and calls ``set_deepspeed_parallelism``, which creates the
    expert-parallel and expert-data-parallel groups (``ep_size_{ep}``; the same rank layout as the job's ep mesh)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class _ExpertGroups(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts of DeepSpeed's own
            self.ep_size = ep_size
            self.num_experts = num_experts
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
                )

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-group marker is not a layer")

    return _ExpertGroups()


class _EngineModule(nn.Module):
    """What DeepSpeed wraps: the job's model (``self.model``) and, under expert parallelism, the group marker."""

    def __init__(self, model: nn.Module, marker: nn.Module | None) -> None:
        super().__init__()
        self.model = model
        if marker is not None:
            self.expert_groups = marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even on one rank: start a one-rank group for a plain process."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(port)),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def deepspeed_config(config: JobConfig, accumulation: int, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a job: batch sizes, accumulation and clipping from ``train`` / ``optim``, ZeRO from
    the ``deepspeed`` section, fp32 weights and gradients (bf16 runs under the trainer's autocast)."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm}
    if ds.zero_stage > 0:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
        zero["contiguous_gradients"] = True  # DeepSpeed requires it with expert param groups in stage 2
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    micro = config.train.micro_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dp_size,
        # Stage 0 leaves the norm unreported: the engine clips there itself (same rule).
        "gradient_clipping": config.optim.grad_clip if ds.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """The DeepSpeed side of the engine seam (see :mod:`framework.engines`)."""

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: JobConfig,
        accumulation: int,
        device: torch.device,
        ep_mesh: DeviceMesh | None = None,
    ) -> None:
        deepspeed = import_deepspeed(device)
        _ensure_process_group(device)
        self.raw = model
        self.optimizer = optimizer
        self.stage = config.deepspeed.zero_stage
        self.grad_clip = config.optim.grad_clip
        self.ep_mesh = ep_mesh
        ep = ep_mesh.size() if ep_mesh is not None else 1
        names = {id(p): n for n, p in model.named_parameters()}
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self._experts = [p for p in model.parameters() if _is_expert(p)]
        if ep > 1 and not self._experts:
            raise ValueError("parallel.ep > 1 but no expert weights are marked (call mark_expert_params)")
        if self._experts and self.stage == 3:
            raise ConfigError("deepspeed.zero_stage", 3, "expected 0, 1 or 2 with expert parallelism")
        if self.stage == 3:
            from deepspeed.utils import set_z3_leaf_module

            # Gather a whole MoE layer at once: its router returns a dataclass whose tensors ZeRO-3's backward hooks
            # cannot see, so per-submodule gathering would release the router weight before its backward.
            for layer in model.moe_layers():  # type: ignore[attr-defined]
                set_z3_leaf_module(layer, True)
        marker = None
        if ep > 1:
            num_experts = max(getattr(layer, "num_experts", 0) for layer in model.moe_layers())  # type: ignore[attr-defined]
            marker = _expert_groups_marker(ep, num_experts)
        dp_size = dist.get_world_size()
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=_EngineModule(model, marker),
            optimizer=optimizer,
            config=deepspeed_config(config, accumulation, dp_size),
        )
        self.model: nn.Module = self.engine
        if ep > 1:
            self._check_expert_groups(ep)

    def _check_expert_groups(self, ep: int) -> None:
        from deepspeed.utils import groups

        ds_group = groups._get_expert_parallel_group(expert_group_name(ep))
        ours = dist.get_process_group_ranks(self.ep_mesh.get_group())  # type: ignore[union-attr]
        theirs = dist.get_process_group_ranks(ds_group)
        if sorted(ours) != sorted(theirs):
            raise RuntimeError(
                f"DeepSpeed's expert-parallel group {theirs} differs from the job's ep mesh {ours} on this rank"
            )

    # --- the step ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """DeepSpeed steps (and ZeRO 0/1 reduce) only on the micro-batch marked as the accumulation boundary."""
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The objective is already divided by the accumulation steps (see the module docstring).
        self.engine.backward(loss, scale_wrt_gas=False)

    def finish_gradients(self) -> None:
        """DeepSpeed reduces and averages gradients itself, expert gradients included."""

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the global gradient norm before clipping."""
        if self.stage == 0:
            norm = self._clip_stage0()
            self.engine.step()
            return norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @torch.no_grad()
    def _clip_stage0(self) -> float:
        """The torch rule over the reduced gradients: dense ones are identical on every rank, expert slices add up
        over the expert-parallel ranks."""
        dense = [p.grad for p in self._params if p.grad is not None and not _is_expert(p)]
        experts = [p.grad for p in self._params if p.grad is not None and _is_expert(p)]
        sq = torch.zeros((), dtype=torch.float64)
        for g in dense:
            sq += g.detach().double().pow(2).sum().cpu()
        expert_sq = torch.zeros((), dtype=torch.float64)
        for g in experts:
            expert_sq += g.detach().double().pow(2).sum().cpu()
        if self.ep_mesh is not None:
            expert_sq = expert_sq.to(self._comm_device())
            dist.all_reduce(expert_sq, group=self.ep_mesh.get_group())
        norm = float((sq + expert_sq.cpu()).sqrt())
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
            for g in dense + experts:
                g.mul_(coef)
        return norm

    def _comm_device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def state_dicts(self) -> StateDicts:
        """Full parameter-name keyed model and optimizer state (collective: ZeRO partitions are gathered)."""
        self._ensure_optim_state()
        return self._state(values=True)

    def state_targets(self) -> StateDicts:
        """Zero tensors of the saved shapes, for the store to load into (no collectives, no optimizer state needed)."""
        return self._state(values=False)

    def _state(self, values: bool) -> StateDicts:
        model_state: dict[str, Any] = {}
        for name, t in self.raw.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter):
                full = (
                    self._full_param(t)
                    if values
                    else torch.zeros(self._shape(t), dtype=t.dtype, device=t.device)
                )
                model_state[name] = self._saved(t, full)
            else:
                model_state[name] = t.detach().clone()
        step = self._step_count() if values else 0.0
        state: dict[str, Any] = {}
        for p, name in zip(self._params, (n for names in self._group_names for n in names)):
            entry: dict[str, Any] = {"step": torch.tensor(float(step), dtype=torch.float32)}
            for key in OPTIM_KEYS:
                full = (
                    self._full_optim(p, key)
                    if values
                    else torch.zeros(self._shape(p), dtype=torch.float32, device=self._comm_device())
                )
                entry[key] = self._saved(p, full)
            state[name] = entry
        return model_state, {"state": state, "param_groups": self._saved_groups()}

    def _saved_groups(self) -> list[dict[str, Any]]:
        """Param groups by parameter name, as the native engine has them: expert groups (split off for DeepSpeed
        only) merge back into the group they came from, in model order."""
        order = {n: i for i, (n, _) in enumerate(self.raw.named_parameters())}
        groups: list[dict[str, Any]] = []
        origin: dict[str, dict[str, Any]] = {}
        for g, names in zip(self.optimizer.param_groups, self._group_names):
            home = origin.get(g.get("group_name", "")) if g.get("moe") else None
            if home is not None:
                home["params"] = sorted([*home["params"], *names], key=order.__getitem__)
                continue
            entry = {
                **{k: v for k, v in g.items() if k not in ("params", "moe", "name")},
                "params": list(names),
            }
            groups.append(entry)
            if "group_name" in g:
                origin.setdefault(g["group_name"], entry)
        return groups

    def load_state_dicts(self, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        """Write full state (from either engine's checkpoint) into the partitions of this rank."""
        params = dict(self.raw.named_parameters())
        with torch.no_grad():
            for name, value in model_state.items():
                local = value.to_local() if isinstance(value, DTensor) else value
                if name in params:
                    self._set_param(params[name], local)
                else:
                    target = self.raw.get_buffer(name)
                    target.copy_(local.to(target.dtype))
        if self.stage > 0:
            self.ds_optimizer.refresh_fp32_params()  # fp32 master partitions from the loaded weights
        self._ensure_optim_state()
        saved = optim_state.get("state", {})
        steps = [float(s["step"]) for s in saved.values() if "step" in s]
        step = max(steps) if steps else 0.0
        for p, name in zip(self._params, (n for names in self._group_names for n in names)):
            entry = saved.get(name)
            if entry is None:
                continue
            for key in OPTIM_KEYS:
                value = entry[key]
                self._set_optim(p, key, value.to_local() if isinstance(value, DTensor) else value)
        for flat in self._flat_partitions():
            self.optimizer.state[flat]["step"].fill_(step)
        self._load_hyperparameters(optim_state.get("param_groups", []))

    def _load_hyperparameters(self, saved_groups: list[dict[str, Any]]) -> None:
        """lr, initial_lr, betas, ... of the saved group that holds each group's first parameter."""
        by_param = {n: g for g in saved_groups for n in g.get("params", [])}
        for group, names in zip(self.optimizer.param_groups, self._group_names):
            source = by_param.get(names[0]) if names else None
            if source is None:
                continue
            for k, v in source.items():
                if k not in ("params", "moe", "name"):
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v

    # --- per-stage access to one parameter's full value and optimizer state -------------------------------------------

    def _shape(self, p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # type: ignore[attr-defined]

    def _saved(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """Expert slices are saved as what they are, shards of ``[E, ...]`` over the ep mesh."""
        if self.ep_mesh is not None and _is_expert(p):
            return DTensor.from_local(full, self.ep_mesh, [Shard(0)], run_check=False)
        return full

    def _full_param(self, p: nn.Parameter) -> torch.Tensor:
        if hasattr(p, "ds_id"):  # ZeRO-3 partition
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            with GatheredParameters([p]):
                return p.detach().clone()
        return p.detach().clone()

    def _set_param(self, p: nn.Parameter, value: torch.Tensor) -> None:
        if hasattr(p, "ds_id"):
            from deepspeed.runtime.zero.partition_parameters import GatheredParameters

            with GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.reshape(p.shape).to(p.dtype))
            return
        p.data.copy_(value.reshape(p.shape).to(p.dtype))

    def _full_optim(self, p: nn.Parameter, key: str) -> torch.Tensor:
        if self.stage == 0:
            return self.optimizer.state[p][key].detach().clone()
        from deepspeed.utils import safe_get_full_optimizer_state

        value = safe_get_full_optimizer_state(p, key)
        return value.reshape(self._shape(p)).float().clone()

    def _set_optim(self, p: nn.Parameter, key: str, value: torch.Tensor) -> None:
        if self.stage == 0:
            self.optimizer.state[p][key].copy_(value.reshape(p.shape))
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value.reshape(self._shape(p)).float(), key)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """The tensors torch AdamW steps: this rank's flat fp32 partitions (ZeRO 1-3), the parameters (stage 0).
        ZeRO-3 puts them in the param groups only while it steps."""
        if self.stage == 0:
            return list(self._params)
        if self.stage == 3:
            return list(self.ds_optimizer.fp32_partitioned_groups_flat)
        return list(self.ds_optimizer.single_partition_of_fp32_groups)

    def _step_count(self) -> float:
        for flat in self._flat_partitions():
            step = self.optimizer.state.get(flat, {}).get("step")
            if step is not None:
                return float(step)
        return 0.0

    def _ensure_optim_state(self) -> None:
        """torch AdamW creates its state at the first step (a resume writes into it before that), and ZeRO 1/2 map
        parameters to their slices of that state only when asked."""
        group = self.optimizer.param_groups[0]
        on_device = bool(group.get("fused") or group.get("capturable"))
        for flat in self._flat_partitions():
            state = self.optimizer.state[flat]
            if not state:
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=flat.device if on_device else torch.device("cpu")
                )
                for key in OPTIM_KEYS:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if self.stage in (1, 2):
            # Point each parameter's fragment map at the (possibly just created) state of its flat partition.
            self.ds_optimizer._hp_optimizer_states_linked = False
            self.ds_optimizer._lazy_init_hp_params_optimizer_state()


def full_gradients(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's reduced gradient, gathered (for tests and debugging: call after the last
    micro-batch's backward, before :meth:`DeepSpeedEngine.step`)."""
    from deepspeed.utils import safe_get_full_grad

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.raw.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if engine.stage == 0 else safe_get_full_grad(p)
        if g is not None:
            out[name] = g.detach().float().reshape(engine._shape(p)).clone()
    return out


__all__ = [
    "DeepSpeedEngine",
    "deepspeed_config",
    "expert_group_name",
    "expert_parallel_params",
    "full_gradients",
    "import_deepspeed",
    "mark_expert_params",
]
