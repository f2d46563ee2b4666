"""chain_of_experts plugin: Chain-of-Experts (Wang et al. 2025, arXiv 2506.18945), an MoE block that routes its tokens
``C`` times in sequence through the same experts, each time with its own router.

With ``x⁰`` the block's normed input (``ffn_norm(h)``), ``C`` iterations ``t = 1 … C``, ``K = moe.top_k`` and
``f_t(x) = Σ_{i ∈ top-(K/C) of router t} g_{t,i}(x)·E_i(x) + shared(x)``:

- ``residual: inner`` (the paper's inner residual, in the core block's form): ``xᵗ = xᵗ⁻¹ + f_t(xᵗ⁻¹)``; the block
  outputs ``h + (x^C − x⁰) = h + Σ_t f_t(xᵗ⁻¹)``, so with C = 1 it is exactly the core MoE block;
- ``residual: inner_no_h`` (the reference ``modeling_coe.py``'s form): the same chain, but the block outputs ``x^C =
  norm(h) + Σ_t f_t`` — the attention residual ``h`` is *not* added back (the layer sets ``owns_residual``);
- ``residual: outer`` (the paper's ablation): ``x¹ = f_1(x⁰)``, ``xᵗ = f_t(rms(xᵗ⁻¹))`` for t ≥ 2 with ``rms`` a
  parameter-free RMS normalisation; the block outputs ``h + x^C``. The reference applies no norm between iterations;
  with this project's depth-scaled output init ``f_1``'s output has an RMS of ~1e-5 at init, and a SwiGLU of it is
  quadratically smaller, so without the norm the second iteration would be dead at init (output RMS ~1e-10).

Each iteration picks ``K / C`` experts, so a token costs the expert FLOPs of a top-``K`` MoE. Expert weights, the
shared experts and the dispatcher are shared by all iterations; routers, aux losses, expert counts and aux-loss-free
biases are per iteration (the iterations are the layer's *routing sites*, see
:meth:`framework.models.moe.layer.MoELayer.site_routers`).

Enable with ``plugins: [chain_of_experts]`` and ``moe.block: chain_of_experts``; options in the section
``chain_of_experts`` (:class:`ChainOfExpertsConfig`). See docs/plugins/chain_of_experts.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from framework.config import ConfigError, JobConfig, option
from framework.config.sections import MoEConfig
from framework.hooks import hookimpl
from framework.hooks.registry import ComponentRegistry
from framework.models.moe import MoELayer, build_topk_router
from framework.observe import console

SECTION = "chain_of_experts"
"""The plugin's config section, and its ``moe_block`` component name."""


@dataclass
class ChainOfExpertsConfig:
    """Chain-of-Experts: ``iterations`` sequential routing passes through the same experts in each MoE layer. Shared
    experts (run in every iteration) are the core's ``moe.shared_experts`` / ``shared_expert_hidden`` /
    ``shared_expert_gate``."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "n_shared_experts": "moe.shared_experts",
        "shared_expert_hidden": "moe.shared_expert_hidden",
        "shared_expert_gate": "moe.shared_expert_gate",
    }
    """Keys this section had before shared experts became a core MoE submodule: an old job file gets an error naming
    the new key."""

    iterations: int = option(
        2,
        doc="Routing iterations C per MoE layer, each with its own router; each routes a token to moe.top_k / C "
        "experts, so C must divide moe.top_k (the expert compute of a top-k MoE).",
        min=1,
    )
    residual: Literal["inner", "inner_no_h", "outer"] = option(
        "inner",
        doc="inner: x_t = x_(t-1) + f_t(x_(t-1)) from the normed input x_0, the block outputs h + (x_C - x_0) "
        "(C = 1 is the core MoE block); inner_no_h: the same chain, the block outputs x_C = norm(h) + sum of f_t "
        "(the reference code's form, h not added back); outer: x_1 = f_1(x_0), x_t = f_t(rms(x_(t-1))) with a "
        "parameter-free RMS norm between iterations, the block outputs h + x_C (the paper's ablation).",
    )


class ChainOfExpertsLayer(MoELayer):
    """``C`` chained routing iterations over one set of experts: ``forward(x_BSD) -> y_BSD`` (module docstring).

    Parts: ``routers`` (``C`` routers, one per iteration, each with ``top_k = moe.top_k / C`` and, with
    ``moe.bias_update_rate > 0``, its own aux-loss-free bias), ``experts`` and ``dispatcher`` (the base layer's,
    reused by every iteration: under expert parallelism each iteration is one all-to-all dispatch and combine), and
    the core layer's optional ``shared_experts`` (``moe.shared_experts``), applied in every iteration. ``top_k`` is
    the per-iteration value; ``active_experts_per_token`` is ``moe.top_k``.
    """

    def __init__(
        self,
        dim: int,
        moe_cfg: MoEConfig,
        coe_cfg: ChainOfExpertsConfig,
        registry: ComponentRegistry | None = None,
    ) -> None:
        iterations = coe_cfg.iterations
        if iterations < 1 or moe_cfg.top_k % iterations:
            raise ValueError(
                f"chain_of_experts.iterations={iterations} must be >= 1 and divide moe.top_k={moe_cfg.top_k}"
            )
        per_iteration = dataclasses.replace(moe_cfg, top_k=moe_cfg.top_k // iterations)
        routers = [_build_router(dim, per_iteration, registry) for _ in range(iterations)]
        # One routing site per iteration, kept in ``self.routers``.
        super().__init__(dim, per_iteration, routers=routers)
        self.residual = coe_cfg.residual
        self.owns_residual = coe_cfg.residual == "inner_no_h"

    def routing_site_names(self) -> list[str]:
        """``iter0``, ``iter1``, … (metrics ``moe/layer<i>/iter<t>/tokens_e<j>``)."""
        return [f"iter{t}" for t in range(len(self.routers))]

    def forward_tokens(self, x_BSD: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
        """The ``C`` iterations on this rank's tokens (its sequence slice under tensor parallelism).

        Returns what the transformer block adds to ``h``: ``Σ_t f_t`` (``inner``; summed directly rather than as
        ``x^C − x⁰``, so C = 1 returns the core layer's output bit for bit) or ``x^C`` (``outer``), or, for
        ``inner_no_h``, the block's whole output ``x^C``."""
        B, S, D = x_BSD.shape
        sum_f_BSD: torch.Tensor | None = None
        for t, router in enumerate(self.routers):
            if self.residual == "outer" and t > 0:
                x_BSD = _rms_normalise(x_BSD)
            x_TD = x_BSD.reshape(B * S, D)
            y_TD = self.route_and_compute(x_TD, router, t, B, S, tp_group)
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD)
            f_BSD = y_TD.view(B, S, D)
            if self.residual == "outer":
                x_BSD = f_BSD
                continue
            sum_f_BSD = f_BSD if sum_f_BSD is None else sum_f_BSD + f_BSD
            # Added in [B, S, D]: with inner_no_h this is the block's output, which must not be a view (FSDP2 warns
            # that an in-place op on a returned view would skip its pre-backward hook).
            x_BSD = x_BSD + f_BSD
        if self.residual == "inner":
            assert sum_f_BSD is not None
            return sum_f_BSD
        return x_BSD

    def extra_repr(self) -> str:
        return f"iterations={len(self.routers)}, residual={self.residual}, top_k_per_iteration={self.top_k}"


def _rms_normalise(x_BSD: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps)`` over the last dimension, statistics in fp32 (no weight: the outer ablation's norm
    between iterations adds no parameters). ``eps`` is far below the usual 1e-5: at init an iteration's output has an
    RMS of ~1e-5 (mean square ~1e-10), which a 1e-5 eps would leave unnormalised."""
    rstd = torch.rsqrt(x_BSD.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x_BSD.float() * rstd).to(x_BSD.dtype)


def _build_router(dim: int, moe_cfg: MoEConfig, registry: ComponentRegistry | None) -> nn.Module:
    """The router selected by ``moe.router`` (core ``topk`` by default), for one iteration's ``top_k``."""
    if registry is None:
        return build_topk_router(dim, moe_cfg)
    return registry.get("router", moe_cfg.router).factory(dim, moe_cfg)


def validate_job(config: JobConfig) -> None:
    """Raise :class:`ConfigError` naming the key when the job cannot use Chain-of-Experts as configured."""
    moe, coe = config.moe, getattr(config, SECTION)
    if moe.block != SECTION:
        raise ConfigError(
            "moe.block",
            moe.block,
            f"expected '{SECTION}' when plugin '{SECTION}' is listed in 'plugins': set `moe.block: {SECTION}` "
            f"(or remove '{SECTION}' from 'plugins')",
        )
    if moe.num_experts == 0:
        raise ConfigError(
            "moe.num_experts",
            moe.num_experts,
            f"expected >= 1: {SECTION} replaces the MoE layers and num_experts=0 makes every layer dense",
        )
    if moe.top_k % coe.iterations:
        raise ConfigError(
            f"{SECTION}.iterations",
            coe.iterations,
            f"expected a divisor of moe.top_k={moe.top_k}: each of the iterations routes a token to "
            f"top_k / iterations experts; set moe.top_k to a multiple of {coe.iterations} or change iterations",
        )


def constant_gate_warning(moe_cfg: MoEConfig, coe_cfg: ChainOfExpertsConfig) -> str | None:
    """Why the routers would get no gradient from the language-model loss, or ``None``.

    With one expert per iteration, renormalising the chosen gate weight (softmax with ``route_norm``, or sigmoid
    scores, which are always renormalised) makes every gate exactly ``route_scale``: the routers then learn from the
    balance losses only. The reference code does not renormalise a single expert's weight (``norm_topk_prob`` only
    applies for top-k > 1).
    """
    if moe_cfg.top_k // coe_cfg.iterations != 1:
        return None
    if moe_cfg.score_func == "softmax" and not moe_cfg.route_norm:
        return None
    fix = (
        "set moe.route_norm: false (gates = softmax scores, as the reference does)"
        if moe_cfg.score_func == "softmax"
        else "use moe.score_func: softmax with moe.route_norm: false"
    )
    return (
        f"{SECTION}: each iteration routes a token to moe.top_k / iterations = 1 expert and renormalises its gate "
        f"weight to exactly {moe_cfg.route_scale}, so the routers learn from the balance losses only; {fix}, or "
        "route to more experts per iteration"
    )


class ChainOfExpertsPlugin:
    """The ``chain_of_experts`` plugin (entry point ``plugins.moe.chain_of_experts:ChainOfExpertsPlugin``).

    One instance per plugin manager (per job): :meth:`expertrain_validate_config` keeps the job's section, which the
    registered ``moe_block`` factory :meth:`build_block` reads when the model is built.
    """

    def __init__(self) -> None:
        self.config: ChainOfExpertsConfig | None = None
        self._warned = False

    @hookimpl
    def expertrain_config_sections(self) -> dict[str, type]:
        return {SECTION: ChainOfExpertsConfig}

    @hookimpl
    def expertrain_register_components(self, registry: ComponentRegistry) -> None:
        registry.register("moe_block", SECTION, self.build_block)

    @hookimpl
    def expertrain_validate_config(self, config: JobConfig) -> None:
        validate_job(config)
        self.config = getattr(config, SECTION)

    def build_block(
        self, dim: int, moe_cfg: MoEConfig, registry: ComponentRegistry | None = None
    ) -> ChainOfExpertsLayer:
        """moe_block component ``"chain_of_experts"``: factory ``(dim, moe_cfg, registry) -> block``."""
        if self.config is None:
            raise RuntimeError(
                f"moe_block '{SECTION}' was built before the job config was validated: the plugin reads its "
                f"'{SECTION}' section in expertrain_validate_config, so call "
                "pm.hook.expertrain_validate_config(config=..., world_size=...) before building the model"
            )
        warning = constant_gate_warning(moe_cfg, self.config)
        if warning and not self._warned:  # once per model, at build time (rank 0 only once ranks exist)
            console.warn(warning)
            self._warned = True
        return ChainOfExpertsLayer(dim, moe_cfg, self.config, registry)
