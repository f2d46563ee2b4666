"""Mixture-of-Experts core: router, dispatch, grouped experts, balancing, and the layer that ties them together."""

from framework.models.moe.dispatch import DispatchContext, LocalDispatcher, TokenDispatcher, expert_capacity
from framework.models.moe.experts import EXPERT_IMPLS, GroupedExperts, resolve_impl
from framework.models.moe.layer import MoEBlock, MoELayer, build_moe_layer, build_topk_router
from framework.models.moe.router import RouterOutput, TopKRouter

__all__ = [
    "EXPERT_IMPLS",
    "DispatchContext",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEBlock",
    "MoELayer",
    "RouterOutput",
    "TokenDispatcher",
    "TopKRouter",
    "build_moe_layer",
    "build_topk_router",
    "expert_capacity",
    "resolve_impl",
]
