"""Language-model loss summed over tokens, so the trainer can normalise by the global count of loss tokens.

Under tensor parallelism the LM head returns vocabulary-parallel logits (a DTensor sharded on the last dimension,
see :func:`framework.parallel.tensor_parallel.apply_tensor_parallel`); :func:`lm_loss_sum` then computes the
cross-entropy under ``torch.distributed.tensor.parallel.loss_parallel`` (no rank gathers the full vocabulary) and
still returns a plain scalar tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from framework.data.labels import IGNORE_INDEX


def lm_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ``IGNORE_INDEX`` (fp32).

    ``logits_BSV`` is a plain tensor, or a DTensor sharded on the vocabulary (last) dimension of a 1-D
    tensor-parallel mesh; ``labels_BS`` is always a plain tensor holding the full labels. Either way the result is a
    plain 0-dim tensor, the sum over this rank's batch (identical on every tensor-parallel rank), that can be mixed
    with plain aux losses and ``.backward()``-ed anywhere: the backward of the vocabulary-parallel case is run under
    ``loss_parallel`` by this function, so callers need no context manager. Gradients reaching each rank's logit shard
    are those of that shard only (no factor of ``tp``).
    """
    if _is_vocab_parallel(logits_BSV):
        if torch.is_grad_enabled() and logits_BSV.requires_grad:
            return _VocabParallelLossSum.apply(logits_BSV, labels_BS)
        return _loss_parallel_sum(logits_BSV, labels_BS).to_local()
    if isinstance(logits_BSV, DTensor):
        if not all(p.is_replicate() for p in logits_BSV.placements):
            raise ValueError(
                f"lm_loss_sum takes plain, replicated or vocabulary-sharded (1-D mesh) logits; got a DTensor "
                f"placed {logits_BSV.placements} on mesh {logits_BSV.device_mesh}"
            )
        logits_BSV = logits_BSV.to_local()
    return _ce_sum(logits_BSV, labels_BS)


def count_loss_tokens(labels_BS: torch.Tensor) -> int:
    return int((labels_BS != IGNORE_INDEX).sum())


def _ce_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _is_vocab_parallel(logits: torch.Tensor) -> bool:
    """A DTensor on a 1-D mesh sharded on its last (vocabulary) dimension."""
    if not isinstance(logits, DTensor) or logits.device_mesh.ndim != 1:
        return False
    (placement,) = logits.placements
    return placement.is_shard() and placement.dim in (-1, logits.ndim - 1)


def _loss_parallel_sum(logits_BSV: DTensor, labels_BS: torch.Tensor) -> DTensor:
    """The summed cross-entropy as a replicated 0-dim DTensor (the vocabulary reductions are all-reduces)."""
    with loss_parallel():
        return _ce_sum(logits_BSV, labels_BS)


class _VocabParallelLossSum(torch.autograd.Function):
    """``loss_parallel`` cross-entropy whose backward also runs under ``loss_parallel``.

    ``loss_parallel`` swaps the DTensor kernels of log-softmax and NLL (forward *and* backward) only while its
    context is open; a backward outside it fails ("aten.nll_loss_backward.default got mixed torch.Tensor and
    DTensor"). The trainer's ``objective.backward()`` runs elsewhere, so the loss graph is built on a detached leaf
    here and differentiated inside the context when autograd reaches this node. Output: the plain local value of
    the replicated loss.
    """

    @staticmethod
    def forward(ctx: Any, logits_BSV: DTensor, labels_BS: torch.Tensor) -> torch.Tensor:
        leaf = logits_BSV.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = _loss_parallel_sum(leaf, labels_BS)
        ctx.leaf, ctx.loss = leaf, loss
        return loss.detach().to_local()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[DTensor, None]:
        leaf, loss = ctx.leaf, ctx.loss
        # The upstream gradient of a value identical on every tp rank is identical on every tp rank: Replicate.
        grad_dt = DTensor.from_local(grad, loss.device_mesh, loss.placements, run_check=False)
        with loss_parallel():
            (grad_logits,) = torch.autograd.grad(loss, leaf, grad_dt)
        return grad_logits, None
