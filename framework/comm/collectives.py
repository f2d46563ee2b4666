"""One thin wrapper over torch.distributed collectives.

Several collective names are deprecated in torch 2.13 and gloo lacks some variants; every call the project makes goes
through here so the rest of the code does not care. Every function is a no-op (identity) without a process group.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In-place sum over ``group`` (all ranks by default); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 for ``None`` without a process group)."""
    if group is None and not is_distributed():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    if group is None and not is_distributed():
        return 0
    return dist.get_rank(group)


def all_to_all_equal(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Exchange equal chunks of ``t`` (dim 0 split into ``group_size`` parts) with every rank; no gradient."""
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out


def all_to_all_autograd(
    t: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Any
) -> torch.Tensor:
    """Uneven all-to-all along dim 0 (sizes may be 0) whose backward is the reverse exchange."""
    return funcol.all_to_all_single_autograd(t, output_splits, input_splits, group)


def all_gather_autograd(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every rank's ``t`` (equal shapes) along dim 0; backward reduce-scatters the gradient."""
    if t.is_cuda:
        return funcol.all_gather_tensor_autograd(t, gather_dim=0, group=group)
    return _GatherDim0.apply(t, group)


def all_gather_no_grad(t: torch.Tensor, group: Any) -> torch.Tensor:
    with torch.no_grad():
        return _gather_dim0(t.detach(), group)


def reduce_scatter_autograd(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over ranks, each keeping its dim-0 block; backward all-gathers the gradient."""
    if t.is_cuda:
        return funcol.reduce_scatter_tensor_autograd(t, "sum", scatter_dim=0, group=group)
    return _ReduceScatterDim0.apply(t, group)


# On CPU (gloo) the functional reduce-scatter crashed intermittently in torch 2.13 (SIGSEGV inside
# reduce_scatter_tensor_autograd, about one run in four of the equivalence tests); these use the blocking collectives
# gloo implements well: all_gather of equal chunks, and all_reduce followed by taking this rank's block.


def _gather_dim0(t: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_dim0(t: torch.Tensor, group: Any) -> torch.Tensor:
    total = t.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


class _GatherDim0(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _gather_dim0(t, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterDim0(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter_dim0(t, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _gather_dim0(grad, ctx.group), None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable values only: this is not for untrusted data)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class RankFailure(RuntimeError):
    """Another rank failed in a phase every rank runs; carries that rank's message."""


# gloo: "Timed out waiting 10000ms for recv operation", "Connection closed by peer", "Connection reset by peer";
# NCCL: "Watchdog caught collective operation timeout".
_COLLECTIVE_FAILURE = re.compile(
    r"timed out waiting|operation timeout|connection (closed|reset) by peer|broken pipe", re.IGNORECASE
)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a collective that timed out or lost a peer."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        backend_error = isinstance(current, dist.DistError) or type(current) is RuntimeError
        if backend_error and _COLLECTIVE_FAILURE.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def run_agreed(phase: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (no rank is left waiting).

    The rank that failed re-raises its own exception; the others raise :class:`RankFailure` quoting it. A collective
    that failed inside ``fn`` is re-raised at once: sharing it would wait for the same unresponsive rank again.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        if is_collective_failure(exc):
            raise
        error = exc
    if is_distributed():
        messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and error is None:
            r, m = failed[0]
            raise RankFailure(f"rank {r} failed during {phase}: {m}")
    if error is not None:
        raise error
    return result


def run_on_rank0(phase: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only, then share its result (or its error) with every rank."""
    error: str | None = None
    result: Any = None
    exc_obj: BaseException | None = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001
            exc_obj = exc
            error = f"{type(exc).__name__}: {exc}"
    result, error = broadcast_object((result, error))
    if exc_obj is not None:
        raise exc_obj
    if error is not None:
        raise RankFailure(f"rank 0 failed during {phase}: {error}")
    return result
