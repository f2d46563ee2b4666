"""Routing bookkeeping between optimizer steps: exact expert counts summed over every rank, the aux-loss-free bias
update, the routing metrics, and forgetting what forwards that are not training left behind.

The trainer drives it as an after-optimizer-step concern, as torchtitan does for the aux-free bias update:
:meth:`RoutingState.after_optimizer_step` once per step (a collective), :meth:`RoutingState.metrics` on logging
steps, :meth:`RoutingState.discard` after evaluation and sampling forwards. It reads only members of the MoE block
contract (:class:`framework.models.moe.MoEBlock`) and the model's ``moe_layers`` / ``discard_routing_state``.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.comm import collectives as C


class RoutingState:
    """The expert counts of the last optimizer step and what the expert-parallel dispatchers sent."""

    def __init__(self, model: nn.Module, ep: int = 1, dispatch_row_bytes: int = 0) -> None:
        """``model``: the raw model (never a data-parallel wrapper). ``ep``: the expert-parallel size (the all-to-all
        metrics are reported when above 1). ``dispatch_row_bytes``: bytes of one dispatched (token, expert) row
        (``model.dim`` × the activation's element size)."""
        self.model = model
        self.ep = ep
        self.dispatch_row_bytes = dispatch_row_bytes
        self.last_counts: list[torch.Tensor] = []
        """Per MoE layer: int64 tokens per expert of the last step over every rank, ``[E]`` or ``[sites, E]``."""
        self.last_remote_rows = 0
        """(token, expert) rows this rank sent to other expert-parallel ranks in the last step's forwards."""

    def after_optimizer_step(self, device: torch.device) -> None:
        """Sum this step's expert counts over every rank that saw tokens (one all-reduce for every layer and routing
        site) and apply the aux-loss-free bias update (a no-op without it). Collective: every rank calls it."""
        layers = self.model.moe_layers()
        if not layers:
            self.last_counts = []
            return
        per_layer = [layer.consume_expert_counts().to("cpu", torch.int64) for layer in layers]
        flat = torch.cat([c.reshape(-1) for c in per_layer])
        C.all_reduce_sum(flat)
        counts = [c.view_as(orig) for c, orig in zip(flat.split([c.numel() for c in per_layer]), per_layer)]
        for layer, c in zip(layers, counts):
            layer.update_expert_bias(c.to(device))
        self.last_counts = counts
        self.last_remote_rows = sum(_take_remote_rows(layer) for layer in layers)

    def metrics(self) -> dict[str, float]:
        """Tokens per expert and max/mean load of the last step, per layer and routing site; the all-to-all volume
        under expert parallelism."""
        out: dict[str, float] = {}
        layers = self.model.moe_layers() if self.last_counts else []
        for i, (layer, counts) in enumerate(zip(layers, self.last_counts)):
            counts = counts.double()
            if counts.dim() == 1:
                sites = [(f"moe/layer{i}", counts)]
            else:  # several routing sites (e.g. Chain-of-Experts iterations): one panel each
                names = layer.routing_site_names()
                sites = [(f"moe/layer{i}/{names[r]}", counts[r]) for r in range(counts.shape[0])]
            for prefix, counts_E in sites:
                for e, v in enumerate(counts_E.tolist()):
                    out[f"{prefix}/tokens_e{e}"] = v
                out[f"{prefix}/max_over_mean"] = float(counts_E.max() / counts_E.mean().clamp_min(1e-9))
        if self.ep > 1:
            # The bytes of one direction (dispatch); combine sends as many back, backward repeats both.
            out["moe/a2a_remote_rows"] = float(self.last_remote_rows)
            out["moe/a2a_dispatch_MB"] = self.last_remote_rows * self.dispatch_row_bytes / 1e6
        return out

    def discard(self) -> None:
        """Forget the aux losses and expert counts of forwards that are not training (they must not move the bias)."""
        self.model.discard_routing_state()


def _take_remote_rows(layer: nn.Module) -> int:
    """Rows an expert-parallel dispatcher sent to other ranks since the last call (0 for local dispatch)."""
    dispatcher = getattr(layer, "dispatcher", None)
    rows = int(getattr(dispatcher, "rows_sent_remote", 0))
    if hasattr(dispatcher, "reset_traffic"):
        dispatcher.reset_traffic()
    return rows
