"""The MoE feed-forward block: router -> dispatcher -> grouped experts -> combine (+ shared experts). Registered as
moe_block ``"moe"``.

:class:`MoEBlock` is the public contract of every MoE block (what the core reads and calls); :class:`MoELayer`
implements it and is the base class of variants, which override its public extension points only
(:meth:`MoELayer.forward_tokens`, :meth:`MoELayer.aux_terms`, :meth:`MoELayer.balance_probs`,
:meth:`MoELayer.routing_site_names`, the ``routers`` constructor argument for several routing sites).

What a trainer reads from every MoE layer (see :class:`MoEBlock`), per micro-batch and per optimizer step:

- after each forward: :meth:`MoELayer.pop_aux_losses` (or ``Transformer.aux_losses()``) and add them to the loss;
- after the optimizer step: ``counts = layer.consume_expert_counts()``, all-reduce ``counts`` (SUM, int64) over every
  rank that routed tokens, then ``layer.update_expert_bias(counts)``;
- whenever it logs: :meth:`MoELayer.routing_stats`.

Counting happens once per token: only in training mode, never during the backward recompute of activation
checkpointing (:func:`framework.models.recompute.in_backward`), and accumulated across micro-batches until
``consume_expert_counts`` is called.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.hooks import RemovableHandle

from framework.comm import collectives as C
from framework.config.sections import MoEConfig
from framework.models.moe.balancing import (
    expert_counts,
    load_balance_loss,
    router_z_loss,
    sequence_load_balance_loss,
    update_bias_,
)
from framework.models.moe.dispatch import LocalDispatcher, TokenDispatcher
from framework.models.moe.experts import GroupedExperts
from framework.models.moe.router import RouterOutput, TopKRouter
from framework.models.moe.shared_experts import SharedExperts
from framework.models.recompute import in_backward

DispatchObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``observer(x_TD, topk_ids_TK, topk_weights_TK)``: called (no gradient needed) with every routing pass's tokens
right before dispatch; under tensor parallelism with split experts, after they are gathered over the tensor-parallel
ranks."""


@runtime_checkable
class MoEBlock(Protocol):
    """The MoE block contract: every member the core (trainer, parallel plans, HF interop, planner, checkpoint
    export) reads or calls on a ``moe_block`` component. :class:`MoELayer` implements it; a variant subclasses
    :class:`MoELayer` and overrides only its public extension points (docs/moe.md, "Writing an MoE variant").

    A block built by a ``moe_block`` factory is checked against this protocol when the model is built (a missing
    member is one error naming the block and the member).
    """

    num_experts: int
    """Routed experts the router(s) choose from (``experts.num_experts`` before expert parallelism)."""
    top_k: int
    """Routed experts per token per routing site."""
    experts: GroupedExperts
    """The routed experts; expert parallelism shards them, tensor parallelism may split their hidden dimension."""
    dispatcher: TokenDispatcher
    """Moves token copies to the experts and back; expert parallelism replaces it with an all-to-all one."""
    shared_experts: nn.Module | None
    """Always-on experts (``moe.shared_experts``), replicated by the parallel plans; ``None`` without them."""
    capacity_factor: float
    """``moe.capacity_factor`` (0 = dropless) the dispatcher applies."""
    drop_policy: str
    """``moe.drop_policy``: which rows an over-capacity expert drops."""
    expert_tensor_parallel: bool
    """Set by the parallel plan when the experts' hidden dimension is split over the tensor-parallel ranks."""
    owns_residual: bool
    """True when the block returns the whole block output (the transformer block then adds no residual)."""

    @property
    def active_experts_per_token(self) -> int:
        """Expert applications per token (the FLOPs count)."""
        ...

    def site_routers(self) -> list[nn.Module]:
        """The routers, one per routing site, in order."""
        ...

    def routing_site_names(self) -> list[str]:
        """One metrics name per routing site."""
        ...

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        """The last training forward's coefficient-weighted auxiliary losses, forgotten once returned."""
        ...

    def consume_expert_counts(self) -> torch.Tensor:
        """int64 routed tokens per expert since the last call (``[E]``, or ``[R, E]`` for ``R`` sites)."""
        ...

    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """The aux-loss-free bias step from all-reduced counts (after the optimizer step)."""
        ...

    def routing_stats(self, reset: bool = True) -> dict[str, float | list[int]]:
        """Routing health since the last reset."""
        ...

    def register_dispatch_observer(self, observer: DispatchObserver) -> RemovableHandle:
        """Observe every routing pass's tokens before dispatch."""
        ...

    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Initialise every weight of the block from ``generator``."""
        ...


def missing_block_members(block: object) -> list[str]:
    """The :class:`MoEBlock` members ``block`` lacks (empty when it meets the contract)."""
    names = list(MoEBlock.__annotations__) + [n for n in vars(MoEBlock) if not n.startswith("_")]
    return [n for n in dict.fromkeys(names) if not hasattr(block, n)]


def build_topk_router(dim: int, moe_cfg: MoEConfig) -> TopKRouter:
    """Router component ``"topk"``: factory ``(dim, moe_cfg) -> router``."""
    return TopKRouter(
        dim,
        moe_cfg.num_experts,
        moe_cfg.top_k,
        score_func=moe_cfg.score_func,
        route_norm=moe_cfg.route_norm,
        route_scale=moe_cfg.route_scale,
        n_groups=moe_cfg.n_groups,
        topk_groups=moe_cfg.topk_groups,
        use_expert_bias=moe_cfg.bias_update_rate > 0,
    )


class MoELayer(nn.Module):
    """Token-choice top-k MoE with SwiGLU experts and optional shared experts: ``forward(x_BSD) -> y_BSD``.

    ``router`` defaults to :class:`TopKRouter` built from ``moe_cfg``; ``dispatcher`` to :class:`LocalDispatcher`
    (an expert-parallel dispatcher plugs in here). A variant that routes several times passes ``routers`` (one per
    routing site, kept as ``self.routers``) instead of ``router``. ``shared_experts`` is built from
    ``moe_cfg.shared_experts`` / ``shared_expert_hidden`` / ``shared_expert_gate`` (``None`` without them).

    Extension points for variants (subclass and override; see docs/moe.md): :meth:`forward_tokens` (the per-token
    computation, calling :meth:`route_and_compute` once per routing site), :meth:`aux_terms` (auxiliary losses of one
    routing pass), :meth:`balance_probs` (the probabilities balancing and routing metrics see),
    :meth:`routing_site_names`; observers of routing passes through :meth:`register_dispatch_observer`.
    """

    def __init__(
        self,
        dim: int,
        moe_cfg: MoEConfig,
        router: nn.Module | None = None,
        dispatcher: TokenDispatcher | None = None,
        routers: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if moe_cfg.num_experts < 1:
            raise ValueError("MoELayer needs moe.num_experts >= 1")
        if routers is not None and (router is not None or not routers):
            raise ValueError("MoELayer takes either one `router` or a non-empty `routers` list, not both")
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.score_func = moe_cfg.score_func
        self.aux_loss_coef = moe_cfg.aux_loss_coef
        self.seq_aux_loss_coef = moe_cfg.seq_aux_loss_coef
        self.z_loss_coef = moe_cfg.z_loss_coef
        self.bias_update_rate = moe_cfg.bias_update_rate
        self.capacity_factor = moe_cfg.capacity_factor
        self.drop_policy = moe_cfg.drop_policy
        if routers is not None:
            self.routers = nn.ModuleList(routers)
        else:
            self.router = router if router is not None else build_topk_router(dim, moe_cfg)
        self.dispatcher: TokenDispatcher = dispatcher or LocalDispatcher(
            moe_cfg.num_experts, moe_cfg.capacity_factor, moe_cfg.drop_policy
        )
        self.experts = GroupedExperts(
            moe_cfg.num_experts, dim, moe_cfg.expert_hidden, impl=moe_cfg.experts_impl
        )
        shared_hidden = moe_cfg.resolved_shared_hidden
        self.shared_experts: SharedExperts | None = (
            SharedExperts(dim, shared_hidden, gated=moe_cfg.shared_expert_gate) if shared_hidden else None
        )
        self.expert_tensor_parallel = False
        """Set by the parallel plan when the experts' hidden dimension is split over the tensor-parallel ranks."""
        self.owns_residual = False
        """When true the transformer block returns ``ffn(norm(h))`` as is instead of ``h + ffn(norm(h))`` (a block
        variant that builds its own residual path, e.g. Chain-of-Experts' inner residual)."""
        self._aux_losses: dict[str, torch.Tensor] = {}
        self._aux_this_forward: dict[str, torch.Tensor] = {}
        # Plain attributes, not buffers: DDP's buffer broadcast must not overwrite a rank's own counts.
        self._counts_RE: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] = {}
        # An OrderedDict, as nn.Module keeps its hooks: RemovableHandle holds a weak reference to it.
        self._dispatch_observers: OrderedDict[int, DispatchObserver] = OrderedDict()

    # ------------------------------------------------------------------ routing sites
    def site_routers(self) -> list[nn.Module]:
        """The routers of this block, one per *routing site* (a place where tokens are routed to ``self.experts``):
        ``[self.router]``, or ``self.routers`` in order when the layer was built with ``routers``. Counts,
        aux-loss-free biases and routing metrics are kept per site."""
        routers = self._modules.get("routers")
        return list(routers) if routers is not None else [self.router]

    def routing_site_names(self) -> list[str]:
        """Names of the routing sites for metrics (``moe/layer<i>/<site>/tokens_e<j>``); unused with one site."""
        return [f"site{i}" for i in range(len(self.site_routers()))]

    @property
    def active_experts_per_token(self) -> int:
        """Expert applications per token (the FLOPs count): ``top_k`` per routing site."""
        return self.top_k * len(self.site_routers())

    def register_dispatch_observer(self, observer: DispatchObserver) -> RemovableHandle:
        """Call ``observer(x_TD, topk_ids_TK, topk_weights_TK)`` on every routing pass, right before dispatch (e.g.
        to collect the inputs each expert receives). Returns a handle whose ``remove()`` detaches it."""
        handle = RemovableHandle(self._dispatch_observers)
        self._dispatch_observers[handle.id] = observer
        return handle

    # ------------------------------------------------------------------ forward
    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        self._aux_this_forward = {}
        if isinstance(x_BSD, DTensor):
            y_BSD = self._forward_tensor_parallel(x_BSD)
        else:
            y_BSD = self.forward_tokens(x_BSD, None)
        if self.training and not in_backward():
            # Computed in an activation-checkpointing recompute too (same ops => same saved tensors), kept only once.
            self._aux_losses = self._aux_this_forward
        self._aux_this_forward = {}
        return y_BSD

    def _forward_tensor_parallel(self, x_BSD: DTensor) -> DTensor:
        """Under tensor parallelism: route this rank's sequence slice only (no token is routed twice).

        The input arrives ``Shard(1)`` (sequence parallel) or ``Replicate``; either way the layer works on the local
        sequence slice and returns the placement it received.
        """
        mesh, placements = x_BSD.device_mesh, x_BSD.placements
        shape, stride = x_BSD.shape, x_BSD.stride()
        if shape[1] % mesh.size():
            raise ValueError(
                f"sequence length {shape[1]} is not a multiple of the tensor-parallel size {mesh.size()}: "
                "pad the batch on the right (causal attention leaves the real positions unchanged)"
            )
        x_local = x_BSD.redistribute(mesh, [Shard(1)]).to_local()
        y_local = self.forward_tokens(x_local, mesh.get_group())
        y_BSD = DTensor.from_local(y_local, mesh, [Shard(1)], run_check=False, shape=shape, stride=stride)
        return y_BSD if tuple(placements) == (Shard(1),) else y_BSD.redistribute(mesh, placements)

    def forward_tokens(self, x_BSD: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
        """Extension point: this rank's tokens ``x_BSD`` (its sequence slice under tensor parallelism) -> ``y_BSD``.

        The plain layer routes once and adds the shared experts. A variant overrides this and calls
        :meth:`route_and_compute` once per routing site (and ``self.shared_experts`` where its form needs them).

        ``tp_group``: the ranks holding the other sequence slices of this micro-batch (aux losses see them all;
        with experts split over the hidden dimension, the routed tokens are gathered over it); pass it on."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        y_TD = self.route_and_compute(x_TD, self.router, 0, B, S, tp_group)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D)

    def route_and_compute(
        self,
        x_TD: torch.Tensor,
        router: nn.Module,
        site: int,
        B: int,
        S: int,
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """One routing pass of ``T = B·S`` tokens through ``router`` (one of :meth:`site_routers`, index ``site``) to
        ``self.experts``: aux losses (:meth:`aux_terms`, added to this forward's terms by name), counts of routing
        site ``site``, dispatch observers, dispatch, grouped experts, combine. Returns ``y_TD``, the gate-weighted
        sum of each token's routed experts (shared experts not included). Call it from :meth:`forward_tokens`."""
        routed: RouterOutput = router(x_TD)
        record = self.training and not in_backward()
        if self.training:
            # In an activation-checkpointing recompute the terms are computed again (the checkpoint needs the same
            # saved tensors) but not kept: the recompute may stop early, before forward's end clears them, and the
            # kept terms would hold the recomputed activations alive until the next step.
            terms = self.aux_terms(routed, B, S, tp_group)
            for name, value in terms.items() if record else ():
                prev = self._aux_this_forward.get(name)
                self._aux_this_forward[name] = value if prev is None else prev + value
        if record:
            self._record(routed, site)

        ids_TK, weights_TK = routed.topk_ids_TK, routed.topk_weights_TK
        gather = tp_group is not None and self.expert_tensor_parallel
        if gather:  # every tensor-parallel rank computes its hidden slice of all the group's tokens
            x_TD = C.all_gather_autograd(x_TD, tp_group)
            weights_TK = C.all_gather_autograd(weights_TK, tp_group)
            ids_TK = C.all_gather_no_grad(ids_TK, tp_group)
        for observe in list(self._dispatch_observers.values()):
            observe(x_TD, ids_TK, weights_TK)
        x_ND, tokens_per_expert_E, ctx = self.dispatcher.dispatch(x_TD, ids_TK, weights_TK)
        if record:
            self._record_drops(ctx.dropped_N, ctx.routed_N, tp_group if gather else None)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        y_TD = self.dispatcher.combine(y_ND, ctx)
        if gather:  # partial sums over the hidden slices -> this rank's tokens, summed
            y_TD = C.reduce_scatter_autograd(y_TD, tp_group)
        return y_TD

    def balance_probs(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Extension point: the per-token probabilities over experts that the balance losses and the routing
        entropy see (sigmoid scores renormalised per token, as DeepSeek-V3 does; softmax scores as they are)."""
        if self.score_func == "sigmoid":  # DeepSeek-V3: normalise sigmoid scores per token
            return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return scores_TE

    def aux_terms(
        self, routed: RouterOutput, B: int, S: int, group: dist.ProcessGroup | None
    ) -> dict[str, torch.Tensor]:
        """Extension point: the auxiliary losses of one routing pass, coefficient-weighted, by name (logged as
        ``loss/<name>``; a name seen at several sites is summed). A variant adds terms to ``super().aux_terms(...)``.

        ``routed`` holds ``T = B·S`` tokens; ``group`` (the tensor-parallel ranks holding the other sequence
        slices, or ``None``) must be passed to the balancing functions so the terms cover the whole micro-batch."""
        terms: dict[str, torch.Tensor] = {}
        if self.aux_loss_coef > 0:
            probs_TE = self.balance_probs(routed.scores_TE)
            terms["load_balance"] = self.aux_loss_coef * load_balance_loss(
                probs_TE, routed.topk_ids_TK, self.num_experts, group
            )
        if self.seq_aux_loss_coef > 0:
            probs_BSE = self.balance_probs(routed.scores_TE).view(B, S, self.num_experts)
            terms["seq_load_balance"] = self.seq_aux_loss_coef * sequence_load_balance_loss(
                probs_BSE, routed.topk_ids_TK.view(B, S, self.top_k), self.num_experts, group
            )
        if self.z_loss_coef > 0:
            terms["router_z"] = self.z_loss_coef * router_z_loss(routed.logits_TE, group)
        return terms

    @torch.no_grad()
    def _record(self, routed: RouterOutput, site: int = 0) -> None:
        counts_E = expert_counts(routed.topk_ids_TK, self.num_experts)
        sites = len(self.site_routers())
        if self._counts_RE is None or self._counts_RE.device != counts_E.device:
            self._counts_RE = torch.zeros(sites, self.num_experts, dtype=torch.int64, device=counts_E.device)
        self._counts_RE[site] += counts_E
        probs_TE = self.balance_probs(routed.scores_TE.detach())
        entropy_T = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(dim=-1)
        self._accumulate(
            counts=counts_E,
            entropy_sum=entropy_T.double().sum(),
            tokens=torch.tensor(entropy_T.numel(), dtype=torch.int64, device=counts_E.device),
        )

    @torch.no_grad()
    def _record_drops(
        self, dropped: torch.Tensor, routed_pairs: int, gathered_over: dist.ProcessGroup | None
    ) -> None:
        """Capacity drops; when tokens were gathered over tensor-parallel ranks each rank saw them all: count once."""
        share = C.group_size(gathered_over) if gathered_over is not None else 1
        device = self._counts_RE.device if self._counts_RE is not None else None
        self._accumulate(
            dropped=torch.as_tensor(dropped, dtype=torch.float64, device=device) / share,
            routed=torch.tensor(routed_pairs / share, dtype=torch.float64, device=device),
        )

    def _accumulate(self, **new: torch.Tensor) -> None:
        for key, value in new.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value.clone()

    # ------------------------------------------------------------------ trainer API
    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        """This micro-batch's auxiliary losses, already multiplied by their coefficients (only terms with coef > 0).

        Returns and forgets them; empty after an eval-mode forward.
        """
        aux, self._aux_losses = self._aux_losses, {}
        return aux

    def consume_expert_counts(self) -> torch.Tensor:
        """Exact int64 tokens routed to each expert since the last call (all micro-batches); then zeroes.

        Shape ``[E]`` for a block with one routing site, ``[R, E]`` for ``R`` sites (see :meth:`site_routers`)."""
        sites = len(self.site_routers())
        if self._counts_RE is None:
            device = self.experts.gate_up_proj.device
            counts = torch.zeros(sites, self.num_experts, dtype=torch.int64, device=device)
        else:
            counts, self._counts_RE = self._counts_RE, None
        return counts[0] if sites == 1 else counts

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free step ``b += γ·sign(mean(c) − c)`` per routing site, with ``counts`` (shaped as
        :meth:`consume_expert_counts` returns them) all-reduced over every rank that routed tokens.

        Call after the optimizer step. A no-op when ``bias_update_rate == 0`` (the routers then have no bias).
        """
        if self.bias_update_rate <= 0:
            return
        counts_RE = counts.view(-1, self.num_experts)
        for router, counts_E in zip(self.site_routers(), counts_RE):
            bias = getattr(router, "expert_bias", None)
            if bias is not None:
                update_bias_(bias, counts_E, self.bias_update_rate)

    def routing_stats(self, reset: bool = True) -> dict[str, float | list[int]]:
        """Routing health since the last reset (training forwards only).

        ``tokens_per_expert``, ``load_max`` / ``load_mean`` (pairs per expert), ``load_max_over_mean`` (1 = perfect
        balance), ``dropped_fraction`` (pairs dropped by capacity), ``router_entropy`` (mean per-token entropy of the
        routing distribution, nats; ``log E`` = uniform).
        """
        if not self._stats:
            return {}
        counts = self._stats["counts"].tolist()  # summed over routing sites
        mean = sum(counts) / len(counts)
        routed = float(self._stats.get("routed", 0))
        tokens = int(self._stats["tokens"])
        stats: dict[str, float | list[int]] = {
            "tokens_per_expert": counts,
            "load_max": float(max(counts)),
            "load_mean": float(mean),
            "load_max_over_mean": float(max(counts) / mean) if mean else math.nan,
            "dropped_fraction": float(self._stats["dropped"]) / routed if routed else 0.0,
            "router_entropy": float(self._stats["entropy_sum"]) / tokens if tokens else math.nan,
        }
        if reset:
            self._stats = {}
        return stats

    # ------------------------------------------------------------------ init
    def init_weights(self, init_std: float, out_std: float, generator: torch.Generator) -> None:
        """Routers in site order ``N(0, init_std)`` (bias 0), experts' gate/up ``N(0, init_std)``, down
        ``N(0, out_std)``, then the shared experts (gate/up and their sigmoid gate ``init_std``, down ``out_std``),
        all from ``generator``."""
        for router in self.site_routers():
            init = getattr(router, "init_weights", None)
            if init is not None:
                init(init_std, out_std, generator)
        self.experts.init_weights(init_std, out_std, generator)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std, out_std, generator)
        self._aux_losses, self._counts_RE, self._stats = {}, None, {}


def build_moe_layer(dim: int, moe_cfg: MoEConfig, registry: object | None = None) -> MoELayer:
    """moe_block component ``"moe"``: factory ``(dim, moe_cfg, registry) -> block``; the router comes from the
    registry entry ``moe_cfg.router`` when a registry is given."""
    router = None
    if registry is not None:
        router = registry.get("router", moe_cfg.router).factory(dim, moe_cfg)  # type: ignore[attr-defined]
    return MoELayer(dim, moe_cfg, router=router)
