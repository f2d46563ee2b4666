"""Run a function on N gloo ranks in spawned processes (real process groups, no mocks)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Array:
    """A tensor in transit: torch's queue pickling shares storage by file descriptor, which breaks once the
    worker exits, so results travel as numpy arrays and become tensors again in the parent."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self.array = (
            t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()
        )

    def restore(self) -> torch.Tensor:
        return torch.from_numpy(self.array).to(self.dtype)


def _map_tree(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``fn`` applied to every leaf of nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _map_tree(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tree(fn, v) for v in obj)
    return fn(obj)


def _portable(obj: Any) -> Any:
    return _map_tree(lambda v: _Array(v) if isinstance(v, torch.Tensor) else v, obj)


def _restore(obj: Any) -> Any:
    return _map_tree(lambda v: v.restore() if isinstance(v, _Array) else v, obj)


def _worker(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any, device: str = "cpu"
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # as torchrun does (OMP_NUM_THREADS=1): ranks share the machine's cores
    try:
        if device == "cuda":  # one GPU per rank (run_ranks checks there are enough); CPU tensors keep gloo
            torch.cuda.set_device(rank)
            dist.init_process_group(
                "cpu:gloo,cuda:nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank)
            )
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", _portable(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120, device: str = "cpu"
) -> list[Any]:
    """Results of ``fn(rank, world, *args)`` per rank; raises with the failing rank's traceback. ``device="cuda"``:
    rank ``r`` on ``cuda:r`` over NCCL (tests/gpu), never two ranks on one GPU."""
    if device == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"{world} NCCL ranks need {world} GPUs; {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, device)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = _restore(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
