"""DeepSeekMoE: shared experts + fine-grained routed experts (arXiv 2401.06066; V2 2405.04434; V3 2412.19437).

    h = u + Σ_{i ≤ Ks} FFN_i(u) + Σ_{i > Ks} g_i · FFN_i(u)

- **Fine-grained segmentation** (``segments`` m): each of the ``moe.num_experts`` N experts of hidden
  ``moe.expert_hidden`` I is split m ways, giving m·N experts of hidden I/m of which m·K are activated
  (K = ``moe.top_k``): the same FLOPs, far more expert combinations.
- **Shared-expert isolation** (the core's ``moe.shared_experts`` Ks): Ks of the fine-grained experts are always on.
  With ``isolate_shared`` (the paper's constant-compute form) they are taken out of the pool: m·N − Ks routed
  experts, top-(m·K − Ks). Without it (the convention of Hugging Face configs, ``n_routed_experts +
  n_shared_experts``) the router keeps m·N experts and top-m·K, and the Ks shared experts come on top. The shared
  experts are the core MoE layer's ``shared_experts`` submodule (:class:`~framework.models.moe.SharedExperts`), here
  of hidden Ks·I/m unless ``moe.shared_expert_hidden`` sets it, optionally behind ``moe.shared_expert_gate``.
- **Balance losses**: expert-level α1·Σ_i f_i·P_i is the core's ``moe.aux_loss_coef`` term on the N′ routed experts
  and top-K′; device-level α2·Σ_d f′_d·P′_d (``device_aux_loss_coef``) over ``devices`` contiguous expert groups,
  the expert-parallel slices: f′_d = mean of f_i over device d's experts, P′_d = their sum.
- **DeepSeek-V3 mode** is the core's routing options with this block: ``moe.score_func: sigmoid``,
  ``moe.bias_update_rate`` (aux-loss-free bias), ``moe.seq_aux_loss_coef``, ``moe.n_groups`` / ``moe.topk_groups``
  (group-limited routing), ``moe.route_scale``, ``moe.first_k_dense``.

A job enables it with ``plugins: [deepseek_moe]`` and ``moe.block: deepseek_moe``; options live in the
``deepseek_moe`` section (docs/plugins/deepseek_moe.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from framework.comm import collectives as C
from framework.config import ConfigError, JobConfig, MoEConfig, option
from framework.hooks import ComponentRegistry, hookimpl
from framework.models.moe import MoELayer, RouterOutput, expert_counts
from framework.observe import console

SECTION = "deepseek_moe"
"""The plugin's config section (and plugin name)."""
BLOCK = "deepseek_moe"
"""The ``moe_block`` component name a job selects with ``moe.block: deepseek_moe``."""


@dataclass
class DeepSeekMoEConfig:
    """DeepSeekMoE: fine-grained routed experts and isolated shared experts (with ``moe.block: deepseek_moe``). The
    shared experts themselves are the core's ``moe.shared_experts`` / ``shared_expert_hidden`` / ``shared_expert_gate``.
    """

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "n_shared_experts": "moe.shared_experts",
        "shared_expert_hidden": "moe.shared_expert_hidden",
        "shared_expert_gate": "moe.shared_expert_gate",
    }
    """Keys this section had before shared experts became a core MoE submodule: an old job file gets an error naming
    the new key."""

    segments: int = option(
        1,
        doc="Fine-grained segmentation m: each of moe.num_experts experts (hidden moe.expert_hidden) becomes m "
        "experts of hidden expert_hidden/m, and m*top_k of them are activated (same FLOPs). 1 = no segmentation.",
        min=1,
    )
    isolate_shared: bool = option(
        True,
        doc="DeepSeekMoE's constant-compute isolation: the Ks = moe.shared_experts come out of the m*num_experts "
        "fine-grained ones (routed m*N-Ks, top m*K-Ks). false: routed m*N, top m*K, Ks shared added on top (the "
        "n_routed_experts + n_shared_experts convention of Hugging Face configs).",
    )
    device_aux_loss_coef: float = option(
        0.0,
        doc="alpha2 of the device-level balance loss alpha2*sum_d f'_d*P'_d over `devices` groups of experts "
        "(DeepSeek-V2 used 0.05); 0 = off. Logged as loss/device_balance.",
        min=0.0,
    )
    devices: int = option(
        0,
        doc="Device groups of the device-level loss (contiguous equal slices of the routed experts, like "
        "expert-parallel ranks); 0 = parallel.ep. Set it explicitly to keep the objective independent of the layout.",
        min=0,
    )


@dataclass(frozen=True)
class DeepSeekShape:
    """The experts a DeepSeekMoE block builds from ``moe.num_experts``/``top_k``/``expert_hidden`` and its options."""

    routed_experts: int
    """N′: experts the router chooses from."""
    routed_top_k: int
    """K′: routed experts per token."""
    expert_hidden: int
    """Hidden size of one fine-grained expert (I/m)."""
    shared_hidden: int
    """Hidden size of the fused shared experts (0 = none)."""


def deepseek_shape(moe: MoEConfig, cfg: DeepSeekMoEConfig) -> DeepSeekShape:
    """Segmentation and isolation arithmetic; a :class:`ConfigError` naming the key when the result is unusable."""
    m, ks = cfg.segments, moe.shared_experts
    if moe.expert_hidden % m:
        raise ConfigError(
            f"{SECTION}.segments",
            m,
            f"expected a divisor of moe.expert_hidden={moe.expert_hidden} (each expert's hidden units are split "
            f"{m} ways); change segments or moe.expert_hidden",
        )
    fine_hidden = moe.expert_hidden // m
    isolated = ks if cfg.isolate_shared else 0
    routed, top_k = m * moe.num_experts - isolated, m * moe.top_k - isolated
    if top_k < 1:
        raise ConfigError(
            "moe.shared_experts",
            ks,
            f"expected fewer than {SECTION}.segments*moe.top_k = {m * moe.top_k}: with isolate_shared each shared "
            "expert replaces one activated fine-grained expert, leaving no routed expert per token; lower "
            f"moe.shared_experts, raise moe.top_k or segments, or set {SECTION}.isolate_shared: false",
        )
    if top_k > routed:
        raise ConfigError(
            "moe.top_k",
            moe.top_k,
            f"expected at most moe.num_experts={moe.num_experts}: the block would route top-{top_k} over only "
            f"{routed} routed experts",
        )
    shared = moe.shared_expert_hidden or ks * fine_hidden
    return DeepSeekShape(routed, top_k, fine_hidden, shared if ks else 0)


def effective_moe_config(moe: MoEConfig, shape: DeepSeekShape) -> MoEConfig:
    """``moe`` with the routed experts' count, top-k and hidden size and the shared experts' hidden size replaced by
    the block's (the core layer builds both from it)."""
    return dataclasses.replace(
        moe,
        num_experts=shape.routed_experts,
        top_k=shape.routed_top_k,
        expert_hidden=shape.expert_hidden,
        shared_expert_hidden=shape.shared_hidden,
    )


def check_config(config: JobConfig) -> DeepSeekShape:
    """Every check of a job that uses the block (raises :class:`ConfigError` naming the key and the fix)."""
    cfg: DeepSeekMoEConfig = getattr(config, SECTION)
    moe, parallel = config.moe, config.parallel
    if moe.block != BLOCK:
        raise ConfigError(
            "moe.block",
            moe.block,
            f"expected '{BLOCK}' when plugin '{SECTION}' is listed; set `moe.block: {BLOCK}` (or remove "
            f"'{SECTION}' from plugins)",
        )
    if moe.num_experts == 0:
        raise ConfigError(
            "moe.num_experts",
            0,
            f"expected >= 1: '{SECTION}' builds MoE blocks (remove it from plugins for a dense model)",
        )
    shape = deepseek_shape(moe, cfg)
    routed = shape.routed_experts
    isolated = moe.shared_experts if cfg.isolate_shared else 0
    how = f"segments*moe.num_experts = {cfg.segments}*{moe.num_experts}" + (
        f" minus {isolated} isolated shared" if isolated else ""
    )
    if routed % parallel.ep:
        raise ConfigError(
            "parallel.ep",
            parallel.ep,
            f"expected a divisor of the {routed} routed experts {SECTION} builds ({how}); change parallel.ep, "
            f"moe.num_experts, {SECTION}.segments or moe.shared_experts",
        )
    etp = parallel.resolved_etp
    if etp > 1 and shape.expert_hidden % etp:
        raise ConfigError(
            f"{SECTION}.segments",
            cfg.segments,
            f"expected the fine-grained expert hidden moe.expert_hidden/segments = {shape.expert_hidden} to be a "
            f"multiple of the expert tensor-parallel size {etp}; change segments or set parallel.etp=1",
        )
    if routed % moe.n_groups:
        raise ConfigError(
            "moe.n_groups",
            moe.n_groups,
            f"expected a divisor of the {routed} routed experts {SECTION} builds ({how})",
        )
    if moe.n_groups > 1 and shape.routed_top_k > moe.topk_groups * (routed // moe.n_groups):
        raise ConfigError(
            "moe.topk_groups",
            moe.topk_groups,
            f"expected the kept groups to hold at least the routed top-k {shape.routed_top_k} "
            f"({routed // moe.n_groups} experts per group)",
        )
    devices = cfg.devices or parallel.ep
    if routed % devices:
        raise ConfigError(
            f"{SECTION}.devices",
            cfg.devices,
            f"expected a divisor of the {routed} routed experts ({how}); the device-level loss groups them in "
            "equal contiguous slices",
        )
    return shape


# --- the device-level balance loss ------------------------------------------------------------------------------


def device_balance_loss(
    probs_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    num_devices: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """DeepSeekMoE's device-level balance loss ``Σ_d f′_d · P′_d`` (unweighted).

    ``f_i = E/(K·T) · c_i`` (``c_i`` routed pairs, no gradient), ``P_i`` = mean probability of expert ``i``; experts
    are split into ``num_devices`` contiguous equal groups; ``f′_d`` = mean of ``f_i`` over group ``d``, ``P′_d`` =
    sum of ``P_i`` over it. With ``group`` (the micro-batch's tokens split over its ranks) the counts are summed over
    it and this rank returns its share, as the core's balance losses do (see ``framework/models/moe/balancing.py``).
    """
    T, K = topk_ids_TK.shape
    T_total = T * (C.group_size(group) if group is not None else 1)
    counts_E = expert_counts(topk_ids_TK, num_experts)
    if group is not None:
        counts_E = C.all_reduce_sum(counts_E.clone(), group)
    f_E = counts_E.to(probs_TE.dtype) * (num_experts / (K * T_total))
    P_E = probs_TE.sum(dim=0) / T_total
    f_D = f_E.view(num_devices, -1).mean(dim=-1)
    P_D = P_E.view(num_devices, -1).sum(dim=-1)
    return (f_D * P_D).sum()


# --- the block --------------------------------------------------------------------------------------------------


class DeepSeekMoELayer(MoELayer):
    """Routed fine-grained experts and the shared experts (the core :class:`MoELayer` on the effective shape) plus
    the device-level balance loss.

    ``moe_cfg`` is the job's ``moe`` section (N, K, I before segmentation); ``num_devices`` the resolved device
    groups of the device-level loss. ``router`` defaults to the core top-k router built for the effective shape.
    """

    def __init__(
        self,
        dim: int,
        moe_cfg: MoEConfig,
        settings: DeepSeekMoEConfig,
        num_devices: int = 1,
        router: nn.Module | None = None,
    ) -> None:
        shape = deepseek_shape(moe_cfg, settings)
        effective = effective_moe_config(moe_cfg, shape)
        super().__init__(dim, effective, router=router)
        if shape.routed_experts % num_devices:
            raise ValueError(f"{num_devices} devices do not divide the {shape.routed_experts} routed experts")
        self.shape = shape
        self.device_aux_loss_coef = settings.device_aux_loss_coef
        self.num_devices = num_devices

    def aux_terms(
        self, routed: RouterOutput, B: int, S: int, group: dist.ProcessGroup | None
    ) -> dict[str, torch.Tensor]:
        """The core's terms on the routed experts, plus ``device_balance`` over ``num_devices`` expert groups."""
        terms = super().aux_terms(routed, B, S, group)
        # One device: f′·P′ = mean(f)·ΣP is constant (no gradient), so the term is left out.
        if self.device_aux_loss_coef > 0 and self.num_devices > 1:
            probs_TE = self.balance_probs(routed.scores_TE)
            terms["device_balance"] = self.device_aux_loss_coef * device_balance_loss(
                probs_TE, routed.topk_ids_TK, self.num_experts, self.num_devices, group
            )
        return terms

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"routed={s.routed_experts}, top_k={s.routed_top_k}, expert_hidden={s.expert_hidden}, "
            f"shared_hidden={s.shared_hidden}, devices={self.num_devices}"
        )


# --- the plugin -------------------------------------------------------------------------------------------------

NO_SHARED_EXPERTS = (
    f"{SECTION}: the blocks have no shared experts (moe.shared_experts: 0); the plugin's former "
    f"{SECTION}.n_shared_experts defaulted to 1, so a job written for it sets moe.shared_experts: 1"
)
"""Warned when a job uses the block without shared experts: a job written before they moved into the core relied
on one shared expert by default."""


class DeepSeekMoEPlugin:
    """The hooks. ``expertrain_validate_config`` keeps the job's options; the registered block factory (a bound
    method, since factories receive only ``(dim, moe_cfg, registry)``) builds each layer from them."""

    def __init__(self) -> None:
        self.settings: DeepSeekMoEConfig | None = None
        self.num_devices = 1

    @hookimpl
    def expertrain_config_sections(self) -> dict[str, type]:
        return {SECTION: DeepSeekMoEConfig}

    @hookimpl
    def expertrain_register_components(self, registry: ComponentRegistry) -> None:
        registry.register("moe_block", BLOCK, self.build_block)

    @hookimpl
    def expertrain_validate_config(self, config: JobConfig, world_size: int) -> None:
        check_config(config)
        if config.moe.shared_experts == 0:
            console.warn(NO_SHARED_EXPERTS)
        self.settings = getattr(config, SECTION)
        self.num_devices = self.settings.devices or config.parallel.ep

    def build_block(
        self, dim: int, moe_cfg: MoEConfig, registry: ComponentRegistry | None = None
    ) -> DeepSeekMoELayer:
        """moe_block factory ``(dim, moe_cfg, registry) -> DeepSeekMoELayer``; the router comes from the registry
        entry ``moe_cfg.router``, built for the effective (segmented) expert count."""
        if self.settings is None:
            raise RuntimeError(
                f"the {BLOCK} block is built before plugin '{SECTION}' validated the job; call the "
                "expertrain_validate_config hook first"
            )
        router = None
        if registry is not None:
            effective = effective_moe_config(moe_cfg, deepseek_shape(moe_cfg, self.settings))
            router = registry.get("router", moe_cfg.router).factory(dim, effective)
        return DeepSeekMoELayer(dim, moe_cfg, self.settings, self.num_devices, router=router)
