"""A third-party MoE variant written from docs/moe.md ("Writing an MoE variant: the block contract") alone, kept
outside ``plugins/``: ``test_outside_moe_variant.py`` installs it under an ``expertrain.plugins`` entry point in a
temporary site folder and trains it on gloo ranks.

``toy_moe`` scales the routed experts' output by a learned scalar ``exp(log_scale)`` (the shared experts are added
unscaled) and adds an auxiliary ``toy_prob_variance`` loss, ``coef · E · Var_e(P_e)`` with ``P_e`` the mean routing
probability of expert ``e`` over the micro-batch: 0 when the mean load is uniform.

Extension points used: ``forward_tokens`` (calling ``route_and_compute``), ``aux_terms`` (on top of the core's),
``balance_probs``, ``init_weights``; everything else is the base ``MoELayer``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from framework.config import ConfigError, JobConfig, MoEConfig, option
from framework.hooks import ComponentRegistry, hookimpl
from framework.models.moe import MoELayer, RouterOutput

SECTION = "toy_moe"


@dataclass
class ToyMoEConfig:
    """The toy variant's options (with ``moe.block: toy_moe``)."""

    prob_variance_coef: float = option(
        0.1, doc="coef of coef * E * Var_e(P_e), logged as loss/toy_prob_variance; 0 = off.", min=0.0
    )


class ToyMoELayer(MoELayer):
    """The core layer with a learned scale on the routed output and one more balance term."""

    def __init__(self, dim: int, moe_cfg: MoEConfig, coef: float, router: nn.Module | None = None) -> None:
        super().__init__(dim, moe_cfg, router=router)
        self.coef = coef
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward_tokens(self, x_BSD: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        y_TD = self.route_and_compute(x_TD, self.router, 0, B, S, tp_group) * self.log_scale.exp()
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D)

    def aux_terms(
        self, routed: RouterOutput, B: int, S: int, group: dist.ProcessGroup | None
    ) -> dict[str, torch.Tensor]:
        terms = super().aux_terms(routed, B, S, group)
        if self.coef > 0:
            P_E = self.balance_probs(routed.scores_TE).mean(dim=0)
            terms["toy_prob_variance"] = self.coef * self.num_experts * P_E.var(unbiased=False)
        return terms

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        super().init_weights(init_std, out_std, generator)
        with torch.no_grad():
            self.log_scale.zero_()


class ToyMoEPlugin:
    """Hooks: the config section, the ``moe_block`` component, and the job check (tensor parallelism is refused:
    the extra term above is computed on this rank's tokens, not over a tensor-parallel group)."""

    def __init__(self) -> None:
        self.coef: float | None = None

    @hookimpl
    def expertrain_config_sections(self) -> dict[str, type]:
        return {SECTION: ToyMoEConfig}

    @hookimpl
    def expertrain_register_components(self, registry: ComponentRegistry) -> None:
        registry.register("moe_block", SECTION, self.build_block)

    @hookimpl
    def expertrain_validate_config(self, config: JobConfig) -> None:
        if config.moe.block != SECTION:
            raise ConfigError("moe.block", config.moe.block, f"expected '{SECTION}' with plugin '{SECTION}'")
        if config.parallel.tp > 1:
            raise ConfigError(
                "parallel.tp", config.parallel.tp, f"expected 1: {SECTION} has no tensor parallelism"
            )
        self.coef = getattr(config, SECTION).prob_variance_coef

    def build_block(
        self, dim: int, moe_cfg: MoEConfig, registry: ComponentRegistry | None = None
    ) -> ToyMoELayer:
        if self.coef is None:
            raise RuntimeError(f"'{SECTION}' block built before the job was validated")
        router = (
            registry.get("router", moe_cfg.router).factory(dim, moe_cfg) if registry is not None else None
        )
        return ToyMoELayer(dim, moe_cfg, self.coef, router)
