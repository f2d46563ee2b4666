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

Routed experts (``lift.target_experts``): every expert's ``gate_up_proj`` (as the ``[2I, H]`` matrix it is in
memory, gate rows first) and ``down_proj`` (``[H, I]``) is a matrix of its own, with its own budget
``K = min((out+in)·r, out·in)`` and its own mask from its own SVD. A :class:`LIFTExperts` holds, per fused weight, a
child ``lift_gate_up_proj`` / ``lift_down_proj`` (:class:`ExpertMasks`) with the buffer ``lift_index [E, K]`` (flat
positions in each expert's matrix) and the Parameter ``lift_values [E, K]``; the forward writes the values into the
(local) expert weights and runs the normal expert kernel.

Parallelism. Masks are always drawn on whole weights, identically on every rank, and broadcast from rank 0: the
transform builds the structure only (it runs on the meta device, before parallelisation); the initial masks are
drawn in ``expertrain_init_weights`` once the base's values are final (keyed init, ``model.init_from`` loaded into
this rank's shards), each weight gathered whole (a collective, one weight at a time) and each rank keeping its
shards of the masks and values; a refresh gathers the updated weights the same way.

- data parallelism (DDP, FSDP2): the values are sharded like any parameter; a refresh gathers and re-shards them and
  the moments;
- tensor parallelism: ``lift_index`` and ``lift_values`` stay whole on every tensor-parallel rank (replicated
  DTensors); each rank writes only the entries that fall into its shard of ``W`` (rows for column-parallel,
  columns for row-parallel layers) and reads the values with ``local_weight``, so their gradient is a partial sum over
  ``tp`` that the framework reduces. Optimizer state stays ``[K]``;
- expert parallelism: the expert masks and values are declared per-expert tensors (dim 0 = experts), so they are cut
  with their experts; under expert tensor parallelism (``parallel.etp``) each rank writes the entries of its slice of
  the hidden dimension. A refresh gathers every expert's weight on every rank (one MoE layer at a time) and computes
  all experts' masks there;
- ``train.engine=deepspeed`` is refused (the refresh remaps the native optimizer's moments).

Ablations: ``lift.mask_type=smallest`` (what the released scripts select) and ``lift.filter_rank=0`` (magnitude of
``W`` itself, no rank reduction). Export: ``expertrain export lift`` (``lift_model.safetensors`` +
``lift_config.json``: the current mask and its trained values per module and per expert weight, see
:func:`lift_tensors`) and ``expertrain export hf --merge``; both rebuild the whole model from any layout's checkpoint.
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
from torch.distributed.tensor import DTensor, Placement, Replicate, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from framework.config import ConfigError, JobConfig, option
from framework.hooks import hookimpl
from framework.models.moe import EXPERT_IMPLS, GroupedExperts, resolve_impl
from framework.models.sharding import local_weight
from framework.observe import console
from plugins.peft.low_rank import hf_module_path
from plugins.peft.modules_to_save import (
    coverage_detail,
    format_fields,
    hf_tensors,
    modules_to_save_option,
    resolve,
    trainable_names,
)
from plugins.peft.targets import (
    ALL_LINEAR,
    Targets,
    claim,
    format_coverage,
    owned_modules,
    restore_plain_experts,
    restore_plain_linear,
    select_targets,
)

SECTION = "lift"
EXPORT_FORMAT = "lift"
GROUP = "lift"
MaskType = Literal["largest", "smallest"]
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass
class LIFTConfig:
    """LIFT (arXiv 2506.00772): sparse fine-tuning of the principal weights of each targeted linear layer."""

    targets: list[str] | str = option(
        ALL_LINEAR,
        doc="Modules to fine-tune sparsely: module-name suffixes (q_proj, ffn.down_proj, ...), a regular expression "
        "matched against whole module paths, or 'all-linear' (every nn.Linear except the LM head); [] with "
        "target_experts: the routed experts only.",
    )
    target_experts: bool = option(
        False,
        doc="Also fine-tune the routed experts: every expert's gate_up_proj ([2I, H]) and down_proj ([H, I]) with its "
        "own budget and mask.",
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
    modules_to_save: list[str] = modules_to_save_option()


# --- the mask -----------------------------------------------------------------------------------------------------


def budget(out_features: int, in_features: int, r: int) -> int:
    """``K = min((out + in)·r, out·in)``: a rank-``r`` LoRA's parameter count, at most the whole matrix."""
    return min((out_features + in_features) * r, out_features * in_features)


@torch.no_grad()
def low_rank_approximation(w: torch.Tensor, k: int) -> torch.Tensor:
    """``U_k S_k V_kᵀ`` of ``w [..., m, n]`` (each matrix of a batch) in fp32 (``w`` itself, in fp32, when ``k`` is 0
    or at least its rank bound). Non-finite entries count as 0 (only an uninitialised model, e.g. one rebuilt for
    export before its checkpoint is loaded, has any)."""
    w32 = w.detach().to(torch.float32).nan_to_num(0.0, 0.0, 0.0)
    if k <= 0 or k >= min(w32.shape[-2:]):
        return w32
    U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
    return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]


@torch.no_grad()
def principal_mask(
    w: torch.Tensor, K: int, filter_rank: int, mask_type: MaskType = "largest"
) -> torch.Tensor:
    """Flat indices (sorted int64 ``[K]``) of the ``K`` largest (or smallest) entries of ``|W′|``, ``W′`` the
    rank-``filter_rank`` approximation of ``w [m, n]``; for a batch ``w [..., m, n]`` one mask per matrix
    (``[..., K]``)."""
    score = low_rank_approximation(w, filter_rank).abs().flatten(-2)
    idx = torch.topk(score, K, dim=-1, largest=mask_type == "largest", sorted=False).indices
    return idx.sort(dim=-1).values


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (SVD round-off may differ across devices; the masks must not)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)
    return t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when ``t`` is a sharded DTensor: a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (no gradient)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def _assign(t: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the whole tensor, identical on every rank) into ``t`` (this rank's shard when a DTensor)."""
    if isinstance(t, DTensor):
        local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
        t.to_local().copy_(local)
    else:
        t.copy_(full)


def _shard_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, global offset)`` of this rank's block of ``t`` (the whole tensor when it is not a DTensor)."""
    if isinstance(t, DTensor):
        return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(t.shape), (0,) * t.dim()


def local_positions(
    index: torch.Tensor, shape: tuple[int, ...], local_shape: tuple[int, ...], offset: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``index`` (flat positions into a tensor of ``shape``): which of them lie in the block of ``local_shape`` at
    ``offset`` (a bool tensor like ``index``) and their flat positions inside that block (meaningful where kept)."""
    coords = torch.unravel_index(index, tuple(shape))
    keep = torch.ones_like(index, dtype=torch.bool)
    pos = torch.zeros_like(index)
    for c, lo, n in zip(coords, offset, local_shape, strict=True):
        keep &= (c >= lo) & (c < lo + n)
        pos = pos * n + (c - lo)
    return keep, pos


# --- the modules --------------------------------------------------------------------------------------------------


class LIFTLinear(nn.Linear):
    """``y = W̃ x + b`` with ``W̃ = W`` except at the ``K`` masked entries, which are the trainable ``lift_values``.

    Takes over ``base``'s ``weight`` / ``bias`` Parameters (names unchanged; ``weight`` is frozen). Buffer
    ``lift_index [K]``: sorted flat indices into ``weight``; Parameter ``lift_values [K]``: the weights there. Both
    stay whole under tensor parallelism (:meth:`tensor_parallel_placements`)."""

    def __init__(self, base: nn.Linear, K: int) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the weight is the base layer's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.register_buffer("lift_index", torch.zeros(K, dtype=torch.int64, device=w.device))
        self.lift_values = nn.Parameter(torch.zeros(K, dtype=w.dtype, device=w.device))

    @staticmethod
    def tensor_parallel_placements(style: str) -> dict[str, Placement]:
        """``lift_values`` is replicated over ``tp`` for either style (the forward writes the entries of this rank's
        rows or columns); the plan replicates the buffer ``lift_index`` by itself."""
        if style not in ("colwise", "rowwise"):
            raise ValueError(f"unknown tensor-parallel style {style!r}; expected 'colwise' or 'rowwise'")
        return {"lift_values": Replicate()}

    @torch.no_grad()
    def draw_mask(self, filter_rank: int, mask_type: MaskType) -> None:
        """The initial mask from the current weight (gathered whole when sharded: a collective, every rank calls
        it for the same modules in the same order; rank 0's mask is broadcast), its values read from the weight;
        each rank keeps its shards of both."""
        w = _full(self.weight)
        # On the buffer's device: with FSDP2's CPU offload the weights live on the host, the buffers (and the
        # broadcast's backend) on the accelerator.
        index = _broadcast(
            principal_mask(w, self.budget, filter_rank, mask_type).to(_local(self.lift_index).device)
        )
        _assign(self.lift_index, index)
        _assign(self.lift_values, w.flatten()[index.to(w.device)])

    def effective_weight(self) -> torch.Tensor:
        """``W`` with ``lift_values`` at ``lift_index`` (differentiable in ``lift_values`` only); under tensor
        parallelism a DTensor placed like ``weight`` whose local block holds this rank's entries."""
        w = self.weight
        if isinstance(w, DTensor):
            local = w.to_local().detach()
            local_shape, offset = _shard_box(w)
            keep, pos = local_positions(_local(self.lift_index), tuple(w.shape), local_shape, offset)
            values = local_weight(self.lift_values)[keep].to(local.dtype)
            eff = local.flatten().index_put((pos[keep],), values).view_as(local)
            return DTensor.from_local(
                eff, w.device_mesh, w.placements, shape=w.shape, stride=w.stride(), run_check=False
            )
        flat = w.detach().flatten()
        return flat.index_put((self.lift_index,), self.lift_values.to(flat.dtype)).view_as(w)

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
        rank) and carry the moments of entries that stay (new entries start at 0). Collective under FSDP and tensor
        parallelism. Returns the fraction of the mask kept."""
        old = _full(self.lift_index).clone()
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
        _assign(self.lift_index, new)
        _assign(self.lift_values, w_full.view(-1)[new])
        return float(kept.float().mean())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The whole trained weight ``W̃`` (the values written at the mask)."""
        w = _full(self.weight).clone()
        w.view(-1)[_full(self.lift_index)] = _full(self.lift_values).to(w.dtype)
        return w

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, K={self.budget}"


class ExpertMasks(nn.Module):
    """The masks of one fused expert weight, one per expert: buffer ``lift_index [E, K]`` (sorted flat positions in
    expert ``e``'s ``[out, in]`` matrix) and Parameter ``lift_values [E, K]`` (the weights there)."""

    def __init__(
        self,
        num_experts: int,
        out_features: int,
        in_features: int,
        K: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.register_buffer("lift_index", torch.zeros(num_experts, K, dtype=torch.int64, device=device))
        self.lift_values = nn.Parameter(torch.zeros(num_experts, K, dtype=dtype, device=device))

    @property
    def budget(self) -> int:
        """``K`` per expert."""
        return self.lift_index.shape[-1]

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, K={self.budget}"


class LIFTExperts(GroupedExperts):
    """Routed experts whose fused weights train only at per-expert masks: expert ``e``'s ``gate_up_proj`` (as
    ``[2I, H]``) and ``down_proj`` (``[H, I]``) each get ``K = min((out+in)·r, out·in)`` entries, the top-``K`` of
    the rank-``k`` SVD approximation of that expert's matrix.

    Takes over ``base``'s weight Parameters (names unchanged, frozen) and adds :class:`ExpertMasks` children
    ``lift_gate_up_proj`` / ``lift_down_proj``. The forward writes the values into the (local) weights and runs the
    expert kernel unchanged. The masks are per-expert tensors (:meth:`per_expert_parameters`): expert parallelism
    cuts them with their experts; under expert tensor parallelism each rank writes the entries in its hidden slice.
    """

    def __init__(self, base: GroupedExperts, r: int) -> None:
        self.init_from_base(base)  # not GroupedExperts.__init__: the weights are the base module's
        E, H, hidden = base.num_experts, base.dim, base.hidden
        kw = {"device": base.gate_up_proj.device, "dtype": base.gate_up_proj.dtype}
        self.lift_gate_up_proj = ExpertMasks(E, 2 * hidden, H, budget(2 * hidden, H, r), **kw)
        self.lift_down_proj = ExpertMasks(E, H, hidden, budget(H, hidden, r), **kw)

    def masks(self) -> dict[str, ExpertMasks]:
        """``{fused weight name: its masks}`` (``gate_up_proj`` first)."""
        return {name: getattr(self, f"lift_{name}") for name in EXPERT_WEIGHTS}

    def per_expert_parameters(self) -> list[str]:
        """The masks and values (dim 0 = experts): cut over ``ep`` like the weights, whole over ``tp``."""
        return [f"lift_{name}.{t}" for name in EXPERT_WEIGHTS for t in ("lift_index", "lift_values")]

    @property
    def budget(self) -> int:
        """Trained entries over all experts and both weights."""
        return sum(m.num_experts * m.budget for m in self.masks().values())

    @torch.no_grad()
    def set_masks(self, filter_rank: int, mask_type: MaskType) -> None:
        """Draw every expert's masks from the current weights, the same on every rank (each fused weight gathered
        whole when sharded, one at a time: a collective), values read from the weights; each rank keeps its shards."""
        for name, mask in self.masks().items():
            w = _full(getattr(self, name))
            E = w.shape[0]
            matrices = w.reshape(E, mask.out_features, mask.in_features)
            # One expert at a time: SVD temporaries of one expert's matrix, not of the whole fused weight.
            index = torch.stack([principal_mask(m, mask.budget, filter_rank, mask_type) for m in matrices])
            index = _broadcast(index.to(_local(mask.lift_index).device))  # see LIFTLinear.draw_mask
            _assign(mask.lift_index, index)
            _assign(mask.lift_values, w.reshape(E, -1).gather(1, index.to(w.device)))

    def effective_weight(self, name: str) -> torch.Tensor:
        """This rank's block of fused weight ``name`` with its experts' values written in (differentiable in the
        values only; a plain local tensor, as the expert kernels take)."""
        w, mask = getattr(self, name), getattr(self, f"lift_{name}")
        local = local_weight(w).detach()
        local_shape, offset = _shard_box(w)
        index = _local(mask.lift_index)
        keep, pos = local_positions(index, tuple(w.shape[1:]), local_shape[1:], offset[1:])
        per_expert = local[0].numel() if local.shape[0] else 0
        pos = pos + torch.arange(index.shape[0], device=pos.device)[:, None] * per_expert
        values = local_weight(mask.lift_values)[keep].to(local.dtype)
        return local.flatten().index_put((pos[keep],), values).view_as(local)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        fn = EXPERT_IMPLS[resolve_impl(self.impl, x_ND.device)]
        w_gate_up_E2IH = self.effective_weight("gate_up_proj")
        return fn(x_ND, w_gate_up_E2IH.flatten(1, 2), self.effective_weight("down_proj"), tokens_per_expert_E)

    @torch.no_grad()
    def refresh(
        self, filter_rank: int, mask_type: MaskType, optimizer: torch.optim.Optimizer | None = None
    ) -> float:
        """Per expert and weight, what :meth:`LIFTLinear.refresh` does: values written into the weight, new mask
        from the updated matrix, surviving moments carried. Gathers every expert's weight on every rank (a
        collective under expert, tensor or data parallelism). Returns the fraction of the masks kept."""
        kept_fractions = []
        for name, mask in self.masks().items():
            w = getattr(self, name)
            w_full = _full(w).clone()
            E = w_full.shape[0]
            flat = w_full.view(E, -1)
            old = _full(mask.lift_index).clone()
            flat.scatter_(1, old, _full(mask.lift_values).to(flat.dtype))
            matrices = flat.view(E, mask.out_features, mask.in_features)
            new = _broadcast(principal_mask(matrices, mask.budget, filter_rank, mask_type).to(old.device))
            pos = torch.searchsorted(old, new).clamp(max=old.shape[-1] - 1)
            kept = old.gather(1, pos) == new
            state = optimizer.state.get(mask.lift_values, {}) if optimizer is not None else {}
            for key in MOMENTS:
                if key in state:
                    moment = _full(state[key])
                    carried = torch.where(kept, moment.gather(1, pos), torch.zeros_like(moment))
                    _assign(state[key], carried)
            _assign(w, w_full)
            _assign(mask.lift_index, new)
            _assign(mask.lift_values, flat.gather(1, new))
            kept_fractions.append(kept.float().mean())
        return float(torch.stack(kept_fractions).mean())

    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """``{name: the whole trained fused weight}`` (every expert's values written at its mask)."""
        merged = {}
        for name, mask in self.masks().items():
            w = _full(getattr(self, name)).clone()
            w.view(w.shape[0], -1).scatter_(1, _full(mask.lift_index), _full(mask.lift_values).to(w.dtype))
            merged[name] = w
        return merged


LIFTModule = LIFTLinear | LIFTExperts


def apply_lift(model: nn.Module, cfg: LIFTConfig, plugin: str = SECTION) -> Targets:
    """Wrap every targeted ``nn.Linear`` in a :class:`LIFTLinear` and, with ``target_experts``, every routed-experts
    module in a :class:`LIFTExperts`. Structure only (masks and values zero; works on the meta device):
    :func:`draw_masks` draws the initial masks once the weights exist. Returns the selected modules (the originals,
    by path)."""
    targets = select_targets(model, cfg.targets, cfg.target_experts, section=SECTION)
    for path, base in targets.linears:
        claim(base, plugin, path)
        module = LIFTLinear(base, budget(base.out_features, base.in_features, cfg.r))
        claim(module, plugin, path)
        model.set_submodule(path, module)
    for path, base in targets.experts:
        claim(base, plugin, path)
        experts = LIFTExperts(base, cfg.r)
        claim(experts, plugin, path)
        model.set_submodule(path, experts)
    return targets


@torch.no_grad()
def draw_masks(model: nn.Module, cfg: LIFTConfig, plugin: str = SECTION) -> None:
    """The initial mask of every module ``plugin`` adapted, from the current (possibly sharded) weights, one weight
    at a time in model order (a collective on a sharded model); identical on every rank and layout."""
    for _, m in lift_modules(model, plugin):
        if isinstance(m, LIFTExperts):
            m.set_masks(cfg.filter_rank, cfg.mask_type)
        else:
            m.draw_mask(cfg.filter_rank, cfg.mask_type)


def lift_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, LIFTModule]]:
    """``(module path, module)`` of every module ``plugin`` adapted, in model order."""
    return owned_modules(model, plugin, (LIFTLinear, LIFTExperts))


def value_modules(model: nn.Module, plugin: str = SECTION) -> list[tuple[str, LIFTLinear | ExpertMasks]]:
    """``(path, module)`` of every module holding a ``lift_values`` Parameter (linear layers and expert masks)."""
    out: list[tuple[str, LIFTLinear | ExpertMasks]] = []
    for path, m in lift_modules(model, plugin):
        if isinstance(m, LIFTExperts):
            out += [(f"{path}.lift_{name}", mask) for name, mask in m.masks().items()]
        else:
            out.append((path, m))
    return out


def value_parameter_names(model: nn.Module, plugin: str = SECTION) -> list[str]:
    """Names of every ``lift_values`` Parameter (the only tensors LIFT trains)."""
    return [f"{path}.lift_values" for path, _ in value_modules(model, plugin)]


def refresh_masks(
    model: nn.Module, cfg: LIFTConfig, optimizer: torch.optim.Optimizer | None, plugin: str = SECTION
) -> float:
    """Refresh every module's masks (:meth:`LIFTLinear.refresh`, :meth:`LIFTExperts.refresh`); returns the mean
    fraction of entries kept."""
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
    def expertrain_validate_config(self, config: JobConfig) -> None:
        cfg: LIFTConfig = getattr(config, SECTION)
        if isinstance(cfg.targets, list) and not cfg.targets and not cfg.target_experts:
            raise ConfigError(
                f"{SECTION}.targets",
                cfg.targets,
                f"expected module-name suffixes, a regex or '{ALL_LINEAR}' (an empty list only with "
                f"{SECTION}.target_experts=true)",
            )
        if config.train.engine != "native":
            raise ConfigError(
                "train.engine",
                config.train.engine,
                "expected native with plugin 'lift' (the mask refresh remaps the optimizer's moments)",
            )

    @hookimpl
    def expertrain_transform_model(self, model: nn.Module, config: JobConfig) -> None:
        cfg: LIFTConfig = getattr(config, SECTION)
        targets = apply_lift(model, cfg)
        trainable = sum(m.budget for _, m in lift_modules(model))
        mask = "magnitude of W" if cfg.filter_rank == 0 else f"|rank-{cfg.filter_rank} SVD of W|"
        detail = (
            f"r={cfg.r} budget, {cfg.mask_type} entries of {mask}, "
            f"refresh every {cfg.update_interval or 'never'} steps"
        )
        saved, count = coverage_detail(model, resolve(model, cfg.modules_to_save, SECTION))
        if saved:
            detail += f"; {saved}"
        console.info(format_coverage(SECTION, model, targets, trainable + count, detail))

    @hookimpl
    def expertrain_init_weights(self, model: nn.Module, config: JobConfig) -> None:
        """The initial masks, on the base as loaded (``model.init_from``), sharded or whole."""
        draw_masks(model, getattr(config, SECTION))

    @hookimpl
    def expertrain_trainable_parameters(self, model: nn.Module, config: JobConfig) -> list[str]:
        saved = resolve(model, getattr(config, SECTION).modules_to_save, SECTION)
        return value_parameter_names(model) + trainable_names(saved)

    @hookimpl
    def expertrain_optimizer_param_groups(self, model: nn.Module, config: JobConfig) -> list[dict[str, Any]]:
        # The values are 1-D (or [E, K]), which the default groups may not decay; LIFT decays exactly the masked
        # entries.
        params = [m.lift_values for _, m in value_modules(model)]
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
        """Write the trained values into each weight and leave plain ``nn.Linear`` / ``GroupedExperts`` modules
        (needs whole weights: a model rebuilt by ``expertrain export``)."""
        merged = []
        for path, module in lift_modules(model):
            if isinstance(module, LIFTExperts):
                with torch.no_grad():
                    for name, weight in module.merged_weights().items():
                        getattr(module, name).copy_(weight)
                restore_plain_experts(model, path, module)
            else:
                with torch.no_grad():
                    module.weight.copy_(module.merged_weight())
                restore_plain_linear(model, path, module)
            merged.append(path)
        return merged or None

    @hookimpl
    def expertrain_merge_tensor(
        self, model: nn.Module, name: str, tensor: torch.Tensor
    ) -> torch.Tensor | None:
        """The streamed ``export hf --merge``: the trained values written at the mask of base tensor ``name`` (the
        arithmetic of ``merged_weight`` / ``merged_weights``)."""
        path, _, weight = name.rpartition(".")
        module = dict(lift_modules(model)).get(path)
        if isinstance(module, LIFTLinear) and weight == "weight":
            tensor.view(-1)[module.lift_index] = module.lift_values.detach().to(tensor.dtype)
            return tensor
        if isinstance(module, LIFTExperts) and weight in module.masks():
            mask = module.masks()[weight]
            values = mask.lift_values.detach().to(tensor.dtype)
            tensor.view(tensor.shape[0], -1).scatter_(1, mask.lift_index, values)
            return tensor
        return None

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


# --- export -------------------------------------------------------------------------------------------------------


def lift_tensors(model: nn.Module, plugin: str = SECTION) -> dict[str, torch.Tensor]:
    """The current masks and trained values with transformers paths (whole tensors: gathered when sharded).

    - linear module ``p``: ``p.lift_indices`` int64 ``[2, K]`` (row, column of every masked entry, SHiRA's layout)
      and ``p.lift_values [K]``; apply as ``weight[idx[0], idx[1]] = values``;
    - routed experts ``p`` (``model.layers.N.mlp.experts``), per fused weight ``w`` in transformers' layout
      (``gate_up_proj [E, 2I, H]``, gate rows first; ``down_proj [E, H, I]``): ``p.w.lift_indices`` int64
      ``[E, 2, K]`` (row, column in expert ``e``'s matrix) and ``p.w.lift_values [E, K]``; apply as
      ``weight[e, idx[e, 0], idx[e, 1]] = values[e]`` for every expert ``e``.
    """
    tensors: dict[str, torch.Tensor] = {}
    for path, m in lift_modules(model, plugin):
        hf = hf_module_path(path)
        if isinstance(m, LIFTExperts):
            for name, mask in m.masks().items():
                idx = _full(mask.lift_index).cpu()
                rows, cols = idx // mask.in_features, idx % mask.in_features
                tensors[f"{hf}.{name}.lift_indices"] = torch.stack([rows, cols], dim=1)
                tensors[f"{hf}.{name}.lift_values"] = _full(mask.lift_values).cpu()
            continue
        idx = _full(m.lift_index).cpu()
        tensors[f"{hf}.lift_indices"] = torch.stack([idx // m.in_features, idx % m.in_features])
        tensors[f"{hf}.lift_values"] = _full(m.lift_values).cpu()
    return tensors


def write_lift(model: nn.Module, config: JobConfig, output_dir: str | Path) -> list[str]:
    """Write ``lift_model.safetensors`` (:func:`lift_tensors`, plus the modules trained in full, ``lift.modules_to_save``,
    under their transformers names) and ``lift_config.json`` into ``output_dir``."""
    cfg: LIFTConfig = getattr(config, SECTION)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = resolve(model, cfg.modules_to_save, SECTION)
    tensors = {k: v.contiguous().clone() for k, v in lift_tensors(model).items()}
    tensors.update(hf_tensors(model, saved))
    save_file(tensors, str(out / "lift_model.safetensors"), metadata={"format": "pt"})
    modules: dict[str, dict[str, Any]] = {}
    for p, m in lift_modules(model):
        if isinstance(m, LIFTExperts):
            for name, mask in m.masks().items():
                modules[f"{hf_module_path(p)}.{name}"] = {
                    "shape": [mask.num_experts, mask.out_features, mask.in_features],
                    "experts": mask.num_experts,
                    "K": mask.budget,
                }
        else:
            modules[hf_module_path(p)] = {"shape": [m.out_features, m.in_features], "K": m.budget}
    meta = {
        "method": "LIFT",
        "base_model_name_or_path": config.model.init_from or None,
        "r": cfg.r,
        "filter_rank": cfg.filter_rank,
        "mask_type": cfg.mask_type,
        "update_interval": cfg.update_interval,
        "target_experts": cfg.target_experts,
        "modules": modules,
        "apply": "weight[lift_indices[0], lift_indices[1]] = lift_values; routed experts (K per expert): "
        "weight[e, lift_indices[e, 0], lift_indices[e, 1]] = lift_values[e] (absolute trained weights at the last "
        "mask; entries that left an earlier mask are only in a merged export)",
        **format_fields(model, saved),
        "apply_modules_to_save": "the tensors named <module>.<tensor> (lm_head.weight, model.norm.weight) replace "
        "the base model's tensors of those names",
    }
    (out / "lift_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ["lift_model.safetensors", "lift_config.json"]
