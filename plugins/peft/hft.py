"""HFT: Half Fine-Tuning (Hui et al., arXiv 2404.18466). Plugin ``hft``.

Half of the parameters are trained, half frozen (``θ = ϑ ∪ ψ``, only ``ϑ`` updated), chosen per transformer block at
the granularity of whole matrices and redrawn (seeded by ``(hft.seed, stage)``) at every training stage:

- attention: 2 of ``{q_proj, k_proj, v_proj, o_proj}`` (in general half of the attention's ``nn.Linear`` modules;
  a q/k head norm follows its projection);
- dense FFN ``{gate_proj, up_proj, down_proj}``: 2 trained in a random half of the blocks (``⌊L/2⌋`` of them), 1 in
  the others (shared experts of an MoE block follow the same draw);
- norms: 1 of ``{attention_norm, ffn_norm}``;
- MoE blocks: half of the routed experts (``⌊E/2⌋``, on global expert indices, identical on every rank), the router
  trained unless ``hft.train_router`` is false;
- everything outside the blocks (embeddings, final norm, LM head) and any other block parameter: trained.

Frozen whole parameters get no gradient and no optimizer state. The fused expert weights (``gate_up_proj [E, ...]``,
``down_proj [E, ...]``) cannot be frozen per expert by ``requires_grad``, so the frozen experts are masked slices:
their gradient is zeroed after backward (before clipping, so the global norm counts trained weights only), the
expert weights sit in an optimizer group without weight decay and the plugin applies AdamW's decoupled decay
``w ← w·(1 − lr·wd)`` to the trained experts only, right before the step (the same operation, in the same order,
as torch's AdamW), and the frozen experts' Adam moments stay 0, so their update ``0/(√0 + eps)`` is exactly 0: frozen
slices stay bit-identical.

Stages: ``hft.stage_every = 0`` makes the whole run one stage (frozen matrices get ``requires_grad = False``: no
backward work for their weight gradients). With ``stage_every = N`` a new selection is drawn every ``N`` steps;
every matrix then stays in the optimizer (the data-parallel wrapper's trainable set is fixed at start-up) and the
gradients of the frozen ones are dropped (set to ``None``) before the step, so they get no update. Their optimizer
state is held at a fresh state's values (step 0, moments 0) rather than absent, so every checkpoint has the same
state keys (a resume's load target has state for every parameter in the optimizer): at a stage boundary the state
of newly frozen matrices and the moments of newly frozen experts are reset to 0, and a matrix trained again later
starts from a fresh state. The selection is saved in checkpoints, so a resumed run continues with the same one.

Adam's age of expert rows: a fused expert weight has one AdamW ``step`` counter, which keeps counting across stages,
while an expert trained anew at a stage boundary starts from zero moments. torch's bias correction ``1 − βᵗ`` with
the tensor's ``t`` would shrink its first update (β1 = 0.9, β2 = 0.95: 0.62× at step 3, 0.43× at step 11). The
plugin records, per expert, the tensor's step count when its moments started (``moment_start``, in the checkpointed
plugin state); for every trained row whose own count ``k = t − start`` gives another bias correction than ``t``
(beyond fp32 round-off: with β2 = 0.95 for its first ~325 steps), it keeps the row's weight from before the step
and, after the step, recomputes the row's update from its moments (which are right: they started from 0) with
``1 − βᵏ``, AdamW's own formula. So each expert steps as a fresh AdamW begun when it began training, and experts that
continue from the previous stage are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.models.moe import GroupedExperts
from framework.models.norms import RMSNorm
from framework.observe import console

SECTION = "hft"
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
BLOCK_NORMS = ("attention_norm", "ffn_norm")
EXPERT_GROUP = "hft_experts"
_HEAD_NORMS = {"q_norm": "q_proj", "k_norm": "k_proj"}


@dataclass
class HFTConfig:
    """Half Fine-Tuning (arXiv 2404.18466): half of each block's matrices trained, redrawn per stage."""

    seed: int = option(0, doc="Seed of the selection; stage s uses the draw of (seed, s).", min=0)
    stage_every: int = option(
        0,
        doc="Steps per training stage (a new half is drawn at each stage); 0 = the whole run is one stage.",
        min=0,
    )
    train_router: bool = option(True, doc="Train the routers of MoE blocks (their experts are half trained).")


@dataclass
class Selection:
    """One stage's choice: whole parameters trained / frozen (by name) and the trained experts of every routed-experts
    module (global expert indices, sorted)."""

    stage: int
    trained: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    experts: dict[str, list[int]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        return {"stage": self.stage, "trained": self.trained, "frozen": self.frozen, "experts": self.experts}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Selection:
        experts = {k: [int(i) for i in v] for k, v in dict(state["experts"]).items()}
        return cls(int(state["stage"]), list(state["trained"]), list(state["frozen"]), experts)


def stage_of(step: int, stage_every: int) -> int:
    """The stage of 1-based optimizer step ``step``."""
    return (step - 1) // stage_every if stage_every > 0 else 0


def _generator(seed: int, stage: int) -> torch.Generator:
    # One stream per (seed, stage); the odd multiplier keeps (seed, stage) pairs apart.
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 7_919 + 0x48465421) % (1 << 63))


def _pick(names: list[str], k: int, generator: torch.Generator) -> set[str]:
    """``k`` of ``names`` uniformly at random (``names`` in a fixed order)."""
    perm = torch.randperm(len(names), generator=generator).tolist()
    return {names[i] for i in perm[:k]}


def _params_of(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in module.named_parameters()]


def select(model: nn.Module, seed: int, stage: int, train_router: bool = True) -> Selection:
    """The HFT selection of ``stage`` (a pure function of the model's structure, ``seed`` and ``stage``)."""
    g = _generator(seed, stage)
    layers = list(model.layers)
    two_ffn = _pick([str(i) for i in range(len(layers))], len(layers) // 2, g)
    trained: set[str] = set()
    experts: dict[str, list[int]] = {}
    in_blocks: set[str] = set()
    for i, block in enumerate(layers):
        prefix = f"layers.{i}"
        in_blocks |= set(_params_of(block, prefix))
        decided: set[str] = set()
        # attention: half of its linear projections (2 of q/k/v/o)
        attn = block.attention
        linears = sorted(n for n, m in attn.named_modules() if isinstance(m, nn.Linear) and n)
        chosen = _pick(linears, len(linears) // 2, g)
        for n in linears:
            names = _params_of(attn.get_submodule(n), f"{prefix}.attention.{n}")
            decided |= set(names)
            if n in chosen:
                trained |= set(names)
        for norm_name, proj in _HEAD_NORMS.items():
            norm = getattr(attn, norm_name, None)
            if isinstance(norm, nn.Module) and proj in linears:
                names = _params_of(norm, f"{prefix}.attention.{norm_name}")
                decided |= set(names)
                if proj in chosen:
                    trained |= set(names)
        # FFN: 2 or 1 of gate/up/down (dense MLP, shared experts), half of the routed experts, the router by option
        ffn = block.ffn
        ffn_linears = [
            (n, m)
            for n, m in ffn.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in FFN_PROJECTIONS
        ]
        leaves = [p for p in FFN_PROJECTIONS if any(n.rsplit(".", 1)[-1] == p for n, _ in ffn_linears)]
        chosen_ffn = _pick(leaves, min(len(leaves), 2 if str(i) in two_ffn else 1), g)
        for n, m in ffn_linears:
            names = _params_of(m, f"{prefix}.ffn.{n}")
            decided |= set(names)
            if n.rsplit(".", 1)[-1] in chosen_ffn:
                trained |= set(names)
        for n, m in ffn.named_modules():
            if isinstance(m, GroupedExperts):
                path = f"{prefix}.ffn.{n}"
                perm = torch.randperm(m.num_experts, generator=g).tolist()
                experts[path] = sorted(perm[: m.num_experts // 2])
                decided |= set(_params_of(m, path))
            elif n.rsplit(".", 1)[-1] == "router" and not train_router:
                decided |= set(_params_of(m, f"{prefix}.ffn.{n}"))
        # norms: 1 of 2
        norms = [n for n in BLOCK_NORMS if isinstance(getattr(block, n, None), RMSNorm)]
        chosen_norm = _pick(norms, len(norms) // 2, g)
        for n in norms:
            names = _params_of(getattr(block, n), f"{prefix}.{n}")
            decided |= set(names)
            if n in chosen_norm:
                trained |= set(names)
        # anything else in the block (e.g. an MoE router, MLA's latent norms) is trained
        trained |= set(_params_of(block, prefix)) - decided
    expert_params = {
        f"{path}.{n}" for path in experts for n, _ in model.get_submodule(path).named_parameters()
    }
    all_names = [n for n, _ in model.named_parameters()]
    trained |= {n for n in all_names if n not in in_blocks}  # embeddings, final norm, LM head
    trained -= expert_params
    frozen = [n for n in all_names if n not in trained and n not in expert_params]
    return Selection(stage, sorted(trained), sorted(frozen), experts)


def trained_fraction(model: nn.Module, selection: Selection) -> float:
    """Share of the model's parameters (expert slices counted per expert) that ``selection`` trains."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    n = sum(params[name].numel() for name in selection.trained)
    for path, ids in selection.experts.items():
        module = model.get_submodule(path)
        per_expert = sum(p.numel() for p in module.parameters()) // module.num_experts
        n += per_expert * len(ids)
    return n / max(total, 1)


# --- masked expert slices -----------------------------------------------------------------------------------------


def local_expert_rows(p: torch.Tensor) -> tuple[int, int]:
    """``(first global expert, count)`` of the rows of expert weight ``p`` this rank holds (dim 0 is experts)."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if shape[0] != p.to_local().shape[0]:
        raise RuntimeError(f"hft: cannot locate the local experts of a weight with placements {p.placements}")
    return int(offset[0]), int(shape[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def frozen_expert_mask(p: torch.Tensor, trained_ids: list[int], num_experts: int) -> torch.Tensor:
    """Bool ``[local experts]``: True at this rank's experts that are frozen."""
    start, count = local_expert_rows(p)
    frozen_E = torch.ones(num_experts, dtype=torch.bool)
    frozen_E[trained_ids] = False
    return frozen_E[start : start + count].to(_local(p).device)


def _expert_weights(model: nn.Module, selection: Selection) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """``(weight, frozen rows mask)`` of every fused expert weight."""
    for path, ids in selection.experts.items():
        module = model.get_submodule(path)
        for _, p in module.named_parameters():
            yield p, frozen_expert_mask(p, ids, module.num_experts)


def allocate_zero_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of ``optimizer`` an AdamW state equal to a fresh one (step 0, moments 0), so that every
    checkpoint holds the same state keys whatever the stage (a resume builds its load target with state for every
    parameter in the optimizer). One step at lr 0 on zero gradients allocates the state without moving a weight."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    with torch.no_grad():
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


def _step_count(state: dict[str, Any]) -> int:
    """The AdamW ``step`` counter of one parameter's state (0 before its first step)."""
    step = state.get("step")
    if step is None:
        return 0
    return int(float(_local(step) if isinstance(step, torch.Tensor) else step))


# Below this relative difference of bias corrections the two updates agree to fp32 round-off (2^-24).
_SAME_CORRECTION = 2.0**-24


def corrections_differ(betas: tuple[float, float], age: int, step: int) -> bool:
    """Whether AdamW's bias corrections at Adam age ``age`` differ from those at ``step`` by more than fp32 round-off
    (β1 = 0.9 with β2 = 0.95: they agree from age ~325 on; with β2 = 0.999 from ~16,600)."""
    return any(abs((1 - beta**age) / (1 - beta**step) - 1) > _SAME_CORRECTION for beta in betas)


@dataclass
class _PendingRows:
    """Rows of one expert weight whose update the plugin recomputes after the optimizer step: their weights before the
    step (decay applied), their local indices, their moments' start counts and the step's learning rate."""

    rows: torch.Tensor
    before: torch.Tensor
    starts: torch.Tensor
    lr: float


def adam_update_rows(
    before: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ages: torch.Tensor,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.Tensor:
    """AdamW's step for rows (dim 0) of Adam age ``ages`` (steps since their moments started, ≥ 1), from the rows'
    weights before the step and their updated moments: ``w − lr/(1−β1ᵏ) · m / (√v / √(1−β2ᵏ) + eps)``, in torch's
    order of operations (decoupled decay is applied to ``before`` already)."""
    shape = (-1,) + (1,) * (before.dim() - 1)
    k = ages.to(torch.float64)
    bias_correction1 = 1 - torch.pow(betas[0], k)
    bias_correction2_sqrt = (1 - torch.pow(betas[1], k)).sqrt()
    step_size = (lr / bias_correction1).to(before.device, before.dtype).view(shape)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(before.device, before.dtype).view(shape)).add_(eps)
    return before - step_size * (exp_avg / denom)


class HFTPlugin:
    """The ``hft`` plugin: holds the current stage's selection and the optimizer (for its state)."""

    def __init__(self) -> None:
        self.selection: Selection | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # Per routed-experts module, per global expert: the fused weights' AdamW step count when its moments started.
        self.moment_start: dict[str, list[int]] = {}
        self._pending: dict[nn.Parameter, _PendingRows] = {}

    # --- registration, validation ---------------------------------------------------------------------------------

    @hookimpl
    def expertrain_config_sections(self) -> dict[str, type]:
        return {SECTION: HFTConfig}

    @hookimpl
    def expertrain_validate_config(self, config: JobConfig) -> None:
        cfg: HFTConfig = getattr(config, SECTION)
        if config.train.engine == "deepspeed" and (config.moe.num_experts > 0 or cfg.stage_every > 0):
            raise ConfigError(
                "train.engine",
                "deepspeed",
                "expected native with plugin 'hft' on an MoE model or with hft.stage_every > 0 (ZeRO keeps its own "
                "gradient partitions, which the expert masks and dropped gradients cannot reach)",
            )

    # --- build ----------------------------------------------------------------------------------------------------

    @hookimpl
    def expertrain_transform_model(self, model: nn.Module, config: JobConfig) -> None:
        cfg: HFTConfig = getattr(config, SECTION)
        self.selection = select(model, cfg.seed, 0, cfg.train_router)
        self.moment_start = {
            path: [0] * model.get_submodule(path).num_experts for path in self.selection.experts
        }
        console.info(self._summary(model, cfg))

    @hookimpl
    def expertrain_init_weights(self, model: nn.Module) -> None:
        """HFT adds no parameters and its selection reads names only: the transform may run on the meta device."""

    def _summary(self, model: nn.Module, cfg: HFTConfig) -> str:
        assert self.selection is not None
        sel = self.selection
        stages = f"a new half every {cfg.stage_every} steps" if cfg.stage_every else "one stage"
        experts = f", half of the experts of {len(sel.experts)} MoE layers" if sel.experts else ""
        return (
            f"hft: stage {sel.stage} ({stages}): {len(sel.trained)} matrices/vectors trained, {len(sel.frozen)} "
            f"frozen{experts}; {100 * trained_fraction(model, sel):.1f}% of the parameters trained"
        )

    @hookimpl
    def expertrain_trainable_parameters(self, model: nn.Module, config: JobConfig) -> list[str]:
        assert self.selection is not None
        if getattr(config, SECTION).stage_every > 0:
            return [n for n, _ in model.named_parameters()]  # every stage's choice must be in the optimizer
        expert_params = [
            f"{path}.{n}"
            for path in self.selection.experts
            for n, _ in model.get_submodule(path).named_parameters()
        ]
        return self.selection.trained + expert_params

    @hookimpl
    def expertrain_optimizer_param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        assert self.selection is not None
        params = [p for p, _ in _expert_weights(model, self.selection)]
        if not params:
            return None
        # No decay from AdamW: the plugin decays the trained experts only (after_backward).
        return [{"params": params, "weight_decay": 0.0, "group_name": EXPERT_GROUP}]

    @hookimpl
    def expertrain_after_optimizer(self, optimizer: torch.optim.Optimizer, config: JobConfig) -> None:
        self.optimizer = optimizer
        if getattr(config, SECTION).stage_every > 0:
            allocate_zero_state(optimizer)

    # --- step -----------------------------------------------------------------------------------------------------

    @hookimpl
    def expertrain_step_begin(self, step: int, model: nn.Module, config: JobConfig) -> None:
        cfg: HFTConfig = getattr(config, SECTION)
        assert self.selection is not None
        stage = stage_of(step, cfg.stage_every)
        if stage == self.selection.stage:
            return
        previous = self.selection
        self.selection = select(model, cfg.seed, stage, cfg.train_router)
        self._freeze_state(model)
        self._start_new_experts(model, previous)
        console.info(self._summary(model, cfg))

    def _start_new_experts(self, model: nn.Module, previous: Selection) -> None:
        """Experts trained now but not in the previous stage start their moments at the weights' current step count."""
        assert self.selection is not None and self.optimizer is not None
        for path, ids in self.selection.experts.items():
            module = model.get_submodule(path)
            starts = self.moment_start.setdefault(path, [0] * module.num_experts)
            first = next(iter(module.parameters()))
            count = _step_count(self.optimizer.state.get(first, {}))
            for expert in set(ids) - set(previous.experts.get(path, [])):
                starts[expert] = count

    def _freeze_state(self, model: nn.Module) -> None:
        """Reset the optimizer state of frozen matrices to a fresh one (step 0, moments 0) and zero the moments of
        frozen experts."""
        assert self.selection is not None and self.optimizer is not None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.selection.frozen:
                for value in self.optimizer.state.get(params[name], {}).values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
            for p, frozen_rows in _expert_weights(model, self.selection):
                state = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state:
                        _local(state[key])[frozen_rows] = 0

    @hookimpl
    def expertrain_after_backward(self, model: nn.Module, config: JobConfig) -> None:
        assert self.selection is not None
        if getattr(config, SECTION).stage_every > 0:
            params = dict(model.named_parameters())
            for name in self.selection.frozen:
                params[name].grad = None
        group = self._expert_group()
        wd = config.optim.weight_decay
        with torch.no_grad():
            for p, frozen_rows in _expert_weights(model, self.selection):
                if p.grad is None:
                    continue
                _local(p.grad)[frozen_rows] = 0
                if wd and group is not None:
                    # AdamW's decoupled decay, applied before the step exactly as torch's AdamW does, trained rows only.
                    _local(p)[~frozen_rows] *= 1 - group["lr"] * wd
        self._keep_young_rows(model, group)

    def _keep_young_rows(self, model: nn.Module, group: dict[str, Any] | None) -> None:
        """Before the step: keep the weights of trained expert rows whose bias correction differs from the tensor's."""
        self._pending = {}
        if group is None or self.optimizer is None or not any(any(s) for s in self.moment_start.values()):
            return
        assert self.selection is not None
        for path, ids in self.selection.experts.items():
            module = model.get_submodule(path)
            starts_E = torch.tensor(self.moment_start.get(path, [0] * module.num_experts), dtype=torch.long)
            for p in module.parameters():
                if p.grad is None:
                    continue  # no step for this weight
                t = _step_count(self.optimizer.state.get(p, {})) + 1
                first, count = local_expert_rows(p)
                starts = starts_E[first : first + count]
                trained = ~frozen_expert_mask(p, ids, module.num_experts).cpu()
                differs = torch.tensor([corrections_differ(group["betas"], t - int(s), t) for s in starts])
                rows = torch.nonzero(trained & differs).flatten()
                if rows.numel():
                    local_rows = rows.to(_local(p).device)
                    self._pending[p] = _PendingRows(
                        local_rows, _local(p).detach()[local_rows].clone(), starts[rows], float(group["lr"])
                    )

    @hookimpl
    def expertrain_after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Recompute the update of the rows kept before the step with their own Adam age."""
        group = self._expert_group()
        if not self._pending or group is None:
            return
        with torch.no_grad():
            for p, pending in self._pending.items():
                state = optimizer.state[p]
                ages = _step_count(state) - pending.starts
                rows = pending.rows
                _local(p)[rows] = adam_update_rows(
                    pending.before,
                    _local(state["exp_avg"])[rows],
                    _local(state["exp_avg_sq"])[rows],
                    ages,
                    pending.lr,
                    group["betas"],
                    group["eps"],
                )
        self._pending = {}

    def _expert_group(self) -> dict[str, Any] | None:
        if self.optimizer is None:
            return None
        return next((g for g in self.optimizer.param_groups if g.get("group_name") == EXPERT_GROUP), None)

    @hookimpl
    def expertrain_metrics(self, model: nn.Module) -> dict[str, float] | None:
        if self.selection is None:
            return None
        return {"hft/stage": float(self.selection.stage)}

    # --- state ----------------------------------------------------------------------------------------------------

    @hookimpl
    def expertrain_state_dict(self) -> dict[str, Any] | None:
        if self.selection is None:
            return None
        return {**self.selection.to_state(), "moment_start": self.moment_start}

    @hookimpl
    def expertrain_load_state_dict(self, model: nn.Module, state: dict[str, Any], config: JobConfig) -> None:
        saved = Selection.from_state(state)
        current = self.selection
        if (
            getattr(config, SECTION).stage_every == 0
            and current is not None
            and (saved.trained, saved.experts) != (current.trained, current.experts)
        ):
            raise ConfigError(
                "hft.seed",
                getattr(config, SECTION).seed,
                "expected the checkpoint's HFT selection, but this job draws another one (hft.seed, "
                "hft.train_router or the model changed); restore them or start a new run directory",
            )
        self.selection = saved
        # Checkpoints from before moment_start was kept: every expert's moments counted from step 0.
        saved_starts = state.get("moment_start") or {}
        self.moment_start = {
            path: [int(s) for s in saved_starts.get(path, [0] * model.get_submodule(path).num_experts)]
            for path in saved.experts
        }

    @hookimpl
    def expertrain_train_end(self, model: nn.Module, summary: dict[str, Any]) -> None:
        if self.selection is not None:
            summary["lines"].append(
                f"hft             stage {self.selection.stage}; "
                f"{100 * trained_fraction(model, self.selection):.1f}% of the parameters trained in the last stage"
            )
