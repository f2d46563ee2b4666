"""Process-group start-up from torchrun's environment, and the device each rank trains on."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """World size torchrun announced (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_choice: str, timeout_s: int) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a plain process gets world size 1."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # On GPUs, CPU tensors (exact int64 routing counts, agreed error messages) still need a backend: gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(*, clean: bool = True) -> None:
    """Destroy the process group; ``clean`` (the job succeeded on this rank) first waits for every rank.

    Without the barrier a rank can reach interpreter finalisation while a gloo worker thread still releases the
    tensors of the last collective: releasing them needs the GIL, the finalising interpreter makes that thread exit,
    and the process aborts ("terminate called without an active exception"). After a barrier every earlier
    collective has completed and been released on every rank. A failed job skips it: a peer may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
