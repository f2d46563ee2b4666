"""LIFT: Low-rank Informed sparse Fine-Tuning (arXiv 2506.00772). Plugin ``lift``.

For every targeted ``nn.Linear`` ``W [m, n]`` only ``K = min((m+n)·r, m·n)`` entries train (the parameter count of a
rank-``r`` LoRA): the "principal weights", the top-``K`` entries of ``|W′|`` where ``W′ = U_k S_k V_kᵀ`` is the rank-``k``
truncated SVD of the current ``W`` (``k = lift.filter_rank``, fp32). Every ``lift.update_interval`` steps the SVD and
mask are recomputed on the updated ``W``; entries that stay in the mask keep their Adam moments, new ones start at 0,
the step counter is not reset.

How it is stored: the weight Parameter keeps its name and is frozen; the masked entries live in a trainable
``lift_values [K]`` Parameter at the flat positions of the buffer ``lift_index [K]`` (sorted, persistent, so the mask
is checkpointed with the model). The forward uses ``W`` with ``lift_values`` written at ``lift_index``. So the
framework's AdamW *is* LIFT's masked AdamW: it holds moments for the ``K`` masked entries only (``[K]``, never
``[m, n]``), its decoupled weight decay touches only them (the plugin claims the values in a group with
``optim.weight_decay``; a 1-D tensor would otherwise get no decay), and no other entry can change. At a mask refresh
the values are written back into ``W`` (entries leaving the mask keep their trained value), the new mask is drawn
and the optimizer state of every ``lift_values`` is remapped in place.

Ablations: ``lift.mask_type=smallest`` (what the released scripts select) and ``lift.filter_rank=0`` (magnitude of
``W`` itself, no rank reduction). Parallelism: data parallelism (DDP and FSDP2; the refresh gathers the full weight
and computes the same mask on every rank, broadcast from rank 0); tensor and expert parallelism and routed experts
are refused. Export: ``expertrain export lift`` (``lift_model.safetensors`` + ``lift_config.json``: the current mask
and its trained values per module) and ``expertrain export hf --merge``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.observe import console
from plugins.peft.low_rank import hf_module_path
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    check_target_spec,
    claim,
    format_coverage,
    owned_modules,
    refuse_model_parallel,
    select_targets,
)

SECTION = "lift"
EXPORT_FORMAT = "lift"
GROUP = "lift"
MaskType = Literal["largest", "smallest"]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class LIFTConfig:
    """LIFT (arXiv 2506.00772): sparse fine-tuning of the principal weights of each targeted linear layer."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to fine-tune sparsely: module-name suffixes (q_proj, ffn.down_proj, ...), a regular expression "
        "matched against whole module paths, or 'all-linear' (every nn.Linear except the LM head).",
    )
    target_experts: bool = option(
        False, doc="Routed experts: not supported by lift (must stay false); use lora for the experts."
    )
    r: int = option(
        128, doc="Budget as a LoRA rank: K = min((out + in) * r, out * in) trained entries per matrix.", min=1
    )
    filter_rank: int = option(
        128,
        doc="Rank k of the SVD approximation W' the mask is drawn from (>= min(out, in): W' = W); 0 = magnitude "
        "of W without rank reduction (the paper's ablation).",
        min=0,
    )
    mask_type: MaskType = option(
        "largest",
        doc="Entries of |W'| to train: largest (the paper's principal weights) or smallest (the released scripts).",
    )
    update_interval: int = option(
        400,
        doc="Steps between mask refreshes (SVD of the updated weights); 0 = one mask for the whole run.",
        min=0,
    )


# --- the mask -----------------------------------------------------------------------------------------------------


def budget(out_features: int, in_features: int, r: int) -> int:
    """``K = min((out + in)·r, out·in)``: a rank-``r`` LoRA's parameter count, at most the whole matrix."""
    return min((out_features + in_features) * r, out_features * in_features)


@torch.no_grad()
def low_rank_approximation(w: torch.Tensor, k: int) -> torch.Tensor:
    """``U_k S_k V_kᵀ`` of ``w`` in fp32 (``w`` itself, in fp32, when ``k`` is 0 or at least its rank bound)."""
    w32 = w.detach().to(torch.float32)
    if k <= 0 or k >= min(w32.shape):
        return w32
    U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@torch.no_grad()
def principal_mask(
    w: torch.Tensor, K: int, filter_rank: int, mask_type: MaskType = "largest"
) -> torch.Tensor:
    """Flat indices (sorted int64 ``[K]``) of the ``K`` largest (or smallest) entries of ``|W′|``, ``W′`` the
    rank-``filter_rank`` approximation of ``w``."""
    score = low_rank_approximation(w, filter_rank).abs().flatten()
    idx = torch.topk(score, K, largest=mask_type == "largest", sorted=False).indices
    return idx.sort().values


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (SVD round-off may differ across devices; the masks must not)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when ``t`` is a sharded DTensor: a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


@torch.no_grad()
def _assign(t: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the whole tensor, identical on every rank) into ``t`` (this rank's shard when a DTensor)."""
    if isinstance(t, DTensor):
        local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        t.to_local().copy_(local)
    else:
        t.copy_(full)


# --- the module ---------------------------------------------------------------------------------------------------


class LIFTLinear(nn.Linear):
    """``y = W̃ x + b`` with ``W̃ = W`` except at the ``K`` masked entries, which are the trainable ``lift_values``.

    Takes over ``base``'s ``weight`` / ``bias`` Parameters (names unchanged; ``weight`` is frozen). Buffer
    ``lift_index [K]``: sorted flat indices into ``weight``; Parameter ``lift_values [K]``: the weights there."""

    def __init__(self, base: nn.Linear, K: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.register_buffer("lift_index", torch.zeros(K, dtype=torch.int64, device=w.device))
        self.lift_values = nn.Parameter(torch.zeros(K, dtype=w.dtype, device=w.device))

    @torch.no_grad()
    def set_mask(self, index: torch.Tensor) -> None:
        """Use ``index`` (sorted flat indices, ``[K]``) as the mask, its values read from the current weight."""
        self.lift_index.copy_(index)
        self.lift_values.copy_(self.weight.detach().flatten()[index])

    def effective_weight(self) -> torch.Tensor:
        """``W`` with ``lift_values`` at ``lift_index`` (differentiable in ``lift_values`` only)."""
        w = self.weight.detach().flatten()
        return w.index_put((self.lift_index,), self.lift_values.to(w.dtype)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    @property
    def budget(self) -> int:
        return self.lift_index.numel()

    @torch.no_grad()
    def refresh(
        self, filter_rank: int, mask_type: MaskType, optimizer: torch.optim.Optimizer | None = None
    ) -> float:
        """Write the trained values into ``weight``, draw the mask again on the updated weight (identically on every
        rank) and carry the moments of entries that stay (new entries start at 0). Collective under FSDP. Returns
        the fraction of the mask kept."""
        old = self.lift_index.clone()
        w_full = _full(self.weight).clone()
        w_full.view(-1)[old] = _full(self.lift_values).to(w_full.dtype)
        new = _broadcast(principal_mask(w_full, self.budget, filter_rank, mask_type).to(old.device))
        pos = torch.searchsorted(old, new).clamp(max=old.numel() - 1)
        kept = old[pos] == new
        state = optimizer.state.get(self.lift_values, {}) if optimizer is not None else {}
        for key in MOMENTS:
            if key in state:
                moment = _full(state[key])
                carried = torch.zeros_like(moment)
                carried[kept] = moment[pos[kept]]
                _assign(state[key], carried)
        _assign(self.weight, w_full)
        self.lift_index.copy_(new)
        _assign(self.lift_values, w_full.view(-1)[new])
        return float(kept.float().mean())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The whole trained weight ``W̃`` (the values written at the mask)."""
        w = _full(self.weight).clone()
        w.view(-1)[self.lift_index] = _full(self.lift_values).to(w.dtype)
        return w

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, K={self.budget}"


def apply_lift(model: nn.Module, cfg: LIFTConfig, plugin: str = SECTION) -> list[tuple[str, nn.Linear]]:
    """Wrap every targeted ``nn.Linear`` in a :class:`LIFTLinear` with its initial mask (drawn from the current
    weights, the same on every rank). Returns the selected ``(path, original module)`` pairs."""
    targets = select_targets(model, cfg.targets, False, section=SECTION)
    for path, base in targets.linears:
        claim(base, plugin, path)
        module = LIFTLinear(base, budget(base.out_features, base.in_features, cfg.r))
        module.set_mask(
            _broadcast(principal_mask(base.weight, module.budget, cfg.filter_rank, cfg.mask_type))
        )
        claim(module, plugin, path)
        model.set_submodule(path, module)
    return targets.linears


def lift_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, LIFTLinear]]:
    """``(module path, module)`` of every module ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, LIFTLinear)


def value_parameter_names(model: nn.Module, plugin: str = SECTION) -> list[str]:
    """Names of every ``lift_values`` Parameter (the only tensors LIFT trains)."""
    return [f"{path}.lift_values" for path, _ in lift_modules(model, plugin)]


def refresh_masks(
    model: nn.Module, cfg: LIFTConfig, optimizer: torch.optim.Optimizer | None, plugin: str = SECTION
) -> float:
    """Refresh every module's mask (:meth:`LIFTLinear.refresh`); returns the mean fraction of entries kept."""
    kept = [m.refresh(cfg.filter_rank, cfg.mask_type, optimizer) for _, m in lift_modules(model, plugin)]
    return sum(kept) / max(len(kept), 1)


def is_refresh_step(step: int, update_interval: int) -> bool:
    """True before 1-based step ``step`` when a new mask is due (steps ``N+1``, ``2N+1``, ...)."""
    return update_interval > 0 and step > 1 and (step - 1) % update_interval == 0


# --- hooks --------------------------------------------------------------------------------------------------------


class LIFTPlugin:
    """The ``lift`` plugin: the mask lives in the model (buffers); the plugin refreshes it."""

    def __init__(self) -> None:
        self.kept: float | None = None

    @hookimpl
    def expertrain_config_sections(self) -> dict[str, type]:
        return {SECTION: LIFTConfig}

    @hookimpl
    def expertrain_validate_config(self, config: JobConfig, world_size: int) -> None:
        cfg: LIFTConfig = getattr(config, SECTION)
        if cfg.target_experts:
            raise ConfigError(
                f"{SECTION}.target_experts",
                True,
                "expected false: lift does not fine-tune the fused routed experts (per-expert masks are not "
                "implemented); adapt them with lora.target_experts and lift the linear layers",
            )
        check_target_spec(SECTION, cfg.targets)
        refuse_model_parallel(config, SECTION, "its masks index whole weight matrices")
        if config.train.engine != "native":
            raise ConfigError(
                "train.engine",
                config.train.engine,
                "expected native with plugin 'lift' (the mask refresh remaps the optimizer's moments)",
            )

    @hookimpl
    def expertrain_transform_model(self, model: nn.Module, config: JobConfig) -> None:
        cfg: LIFTConfig = getattr(config, SECTION)
        linears = apply_lift(model, cfg)
        trainable = sum(m.budget for _, m in lift_modules(model))
        mask = "magnitude of W" if cfg.filter_rank == 0 else f"|rank-{cfg.filter_rank} SVD of W|"
        detail = (
            f"r={cfg.r} budget, {cfg.mask_type} entries of {mask}, "
            f"refresh every {cfg.update_interval or 'never'} steps"
        )
        console.info(format_coverage(SECTION, model, Targets(linears=linears), trainable, detail))

    @hookimpl
    def expertrain_trainable_parameters(self, model: nn.Module) -> list[str]:
        return value_parameter_names(model)

    @hookimpl
    def expertrain_optimizer_param_groups(self, model: nn.Module, config: JobConfig) -> list[dict[str, Any]]:
        # The values are 1-D, which the default groups would not decay; LIFT decays exactly the masked entries.
        params = [m.lift_values for _, m in lift_modules(model)]
        return [{"params": params, "weight_decay": config.optim.weight_decay, "group_name": GROUP}]

    @hookimpl
    def expertrain_step_begin(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, config: JobConfig
    ) -> None:
        cfg: LIFTConfig = getattr(config, SECTION)
        if is_refresh_step(step, cfg.update_interval):
            self.kept = refresh_masks(model, cfg, optimizer)
            console.info(
                f"lift: new masks before step {step}; {100 * self.kept:.1f}% of the masked entries kept"
            )

    @hookimpl
    def expertrain_metrics(self) -> dict[str, float] | None:
        return {"lift/mask_kept": self.kept} if self.kept is not None else None

    @hookimpl
    def expertrain_merge_adapters(self, model: nn.Module) -> list[str] | None:
        """Write the trained values into each weight and leave plain ``nn.Linear`` modules."""
        merged = []
        for path, module in lift_modules(model):
            plain = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            with torch.no_grad():
                module.weight.copy_(module.merged_weight())
            plain.weight, plain.bias = module.weight, module.bias
            model.set_submodule(path, plain)
            merged.append(path)
        return merged or None

    @hookimpl
    def expertrain_export(
        self, model: nn.Module, config: JobConfig, output_dir: Path, export_format: str
    ) -> list[str] | None:
        if export_format != EXPORT_FORMAT:
            return None
        return write_lift(model, config, output_dir)

    @hookimpl
    def expertrain_train_end(self, model: nn.Module, summary: dict[str, Any]) -> None:
        summary["lines"].append(
            f"lift            {len(lift_modules(model))} sparsely tuned modules; export with "
            f"`expertrain export {EXPORT_FORMAT} --checkpoint {summary.get('run_dir', '<run dir>')} --output <dir>` "
            "or `expertrain export hf --merge`"
        )


def lift_tensors(model: nn.Module, plugin: str = SECTION) -> dict[str, torch.Tensor]:
    """Per module (transformers path ``p``): ``p.lift_indices`` int64 ``[2, K]`` (row, column of every masked entry,
    SHiRA's layout) and ``p.lift_values`` ``[K]`` (the trained weights there)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, m in lift_modules(model, plugin):
        idx = m.lift_index.detach().cpu()
        hf = hf_module_path(path)
        tensors[f"{hf}.lift_indices"] = torch.stack([idx // m.in_features, idx % m.in_features])
        tensors[f"{hf}.lift_values"] = _full(m.lift_values).cpu()
    return tensors


def write_lift(model: nn.Module, config: JobConfig, output_dir: str | Path) -> list[str]:
    """Write ``lift_model.safetensors`` (:func:`lift_tensors`) and ``lift_config.json`` into ``output_dir``."""
    cfg: LIFTConfig = getattr(config, SECTION)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().clone() for k, v in lift_tensors(model).items()}
    save_file(tensors, str(out / "lift_model.safetensors"), metadata={"format": "pt"})
    meta = {
        "method": "LIFT",
        "base_model_name_or_path": config.model.init_from or None,
        "r": cfg.r,
        "filter_rank": cfg.filter_rank,
        "mask_type": cfg.mask_type,
        "update_interval": cfg.update_interval,
        "modules": {
            hf_module_path(p): {"shape": [m.out_features, m.in_features], "K": m.budget}
            for p, m in lift_modules(model)
        },
        "apply": "weight[lift_indices[0], lift_indices[1]] = lift_values (absolute trained weights at the last "
        "mask; entries that left an earlier mask are only in a merged export)",
    }
    (out / "lift_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["lift_model.safetensors", "lift_config.json"]
