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
from framework.models.moe.experts import GroupedExperts
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


class HFTPlugin:
    """The ``hft`` plugin: holds the current stage's selection and the optimizer (for its state)."""

    def __init__(self) -> None:
        self.selection: Selection | None = None
        self.optimizer: torch.optim.Optimizer | None = None

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
        self.selection = select(model, cfg.seed, stage, cfg.train_router)
        self._freeze_state(model)
        console.info(self._summary(model, cfg))

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
        return self.selection.to_state() if self.selection is not None else None

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

    @hookimpl
    def expertrain_train_end(self, model: nn.Module, summary: dict[str, Any]) -> None:
        if self.selection is not None:
            summary["lines"].append(
                f"hft             stage {self.selection.stage}; "
                f"{100 * trained_fraction(model, self.selection):.1f}% of the parameters trained in the last stage"
            )
