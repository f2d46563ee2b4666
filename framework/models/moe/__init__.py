"""Mixture-of-Experts core: router, dispatch, grouped experts, shared experts, balancing, and the layer that ties them
together.

This package's ``__all__`` is the public MoE API plugins build on (docs/moe.md, "Writing an MoE variant"): the block
contract :class:`MoEBlock` and its base implementation :class:`MoELayer` (extension points ``forward_tokens``,
``route_and_compute``, ``aux_terms``, ``balance_probs``, ``routing_site_names``, ``register_dispatch_observer``),
the grouped experts (:class:`GroupedExperts`, ``EXPERT_IMPLS``, :func:`resolve_impl`), dispatch
(:class:`TokenDispatcher`, :class:`LocalDispatcher`, :class:`DispatchContext`, :func:`expert_capacity`), routing
(:class:`TopKRouter`, :class:`RouterOutput`), :class:`SharedExperts` and the balancing functions. Plugins import them from
here (the submodules are an implementation layout).
"""

from framework.models.moe.balancing import (
    expert_counts,
    load_balance_loss,
    router_z_loss,
    sequence_load_balance_loss,
)
from framework.models.moe.dispatch import DispatchContext, LocalDispatcher, TokenDispatcher, expert_capacity
from framework.models.moe.experts import EXPERT_IMPLS, GroupedExperts, resolve_impl
from framework.models.moe.layer import (
    DispatchObserver,
    MoEBlock,
    MoELayer,
    build_moe_layer,
    build_topk_router,
    missing_block_members,
)
from framework.models.moe.router import RouterOutput, TopKRouter
from framework.models.moe.shared_experts import SharedExperts

__all__ = [
    "EXPERT_IMPLS",
    "DispatchContext",
    "DispatchObserver",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEBlock",
    "MoELayer",
    "RouterOutput",
    "SharedExperts",
    "TokenDispatcher",
    "TopKRouter",
    "build_moe_layer",
    "build_topk_router",
    "expert_capacity",
    "expert_counts",
    "load_balance_loss",
    "missing_block_members",
    "resolve_impl",
    "router_z_loss",
    "sequence_load_balance_loss",
]
