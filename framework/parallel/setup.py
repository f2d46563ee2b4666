"""Process-group start-up from torchrun's environment, and the device each rank trains on."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from framework.config.errors import ConfigError

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
"""cuBLAS is only deterministic with a fixed workspace (CUDA >= 10.2); torch checks this variable when
``torch.use_deterministic_algorithms(True)`` is on and a cuBLAS call runs."""

NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_CLEAN_UP_ONLY = "2"
"""A timed-out NCCL collective: torch's default (3) ends the process from NCCL's watchdog thread, before Python sees an
error, so no rank could be named; 2 aborts the communicators and lets the next collective raise in Python, where
:func:`framework.parallel.watchdog.explain` turns it into one line naming the rank that hung."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells one rank about its job (every field 0/1-based defaults for a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    """Ranks started on this machine (torchrun's ``--nproc_per_node``)."""

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        """The launch variables of ``environ`` (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            # A launcher without LOCAL_WORLD_SIZE: assume every rank is local (the safe side of the GPU check).
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


def env_world_size() -> int:
    """World size torchrun announced (1 when started as a plain process)."""
    return LaunchEnv.read().world_size


def pick_device(
    choice: str, local_rank: int, local_world_size: int = 1, visible_gpus: int | None = None
) -> torch.device:
    """The device of the rank ``local_rank`` of ``local_world_size`` ranks on this machine.

    ``choice`` is ``train.device``: ``cpu``; ``cuda`` (an error when no GPU is visible); ``auto`` (cuda when a GPU is
    visible, else cpu). ``visible_gpus`` defaults to ``torch.cuda.device_count()`` (a parameter so that every branch
    is testable without a GPU). On CUDA, local rank ``i`` gets ``cuda:i``; more local ranks than visible GPUs is
    refused: NCCL cannot run two ranks of one group on one GPU (it stops with "Duplicate GPU detected" at the first
    collective), so sharing is never offered and the error names the fix before anything starts.
    """
    if choice == "cpu":
        return torch.device("cpu")
    if choice not in ("auto", "cuda"):
        raise ConfigError("train.device", choice, "expected one of auto, cpu, cuda")
    gpus = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    if gpus == 0:
        if choice == "cuda":
            raise ConfigError(
                "train.device",
                choice,
                "no CUDA device is visible to this process; set train.device=cpu (or auto)",
            )
        return torch.device("cpu")
    if local_world_size > gpus:
        raise ConfigError(
            "train.device",
            choice,
            f"{local_world_size} ranks on this machine but {gpus} visible GPU(s), and NCCL cannot put two ranks on "
            f"one GPU; start at most {gpus} (--nproc_per_node <= {gpus}) or set train.device=cpu",
        )
    return torch.device("cuda", local_rank)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """``train.deterministic``: torch's deterministic algorithms on (the MoE scatter paths follow them, see
    :func:`framework.models.moe.dispatch.LocalDispatcher.combine`), and on CUDA the fixed cuBLAS workspace they need.

    Call before CUDA is initialised: cuBLAS reads the workspace variable when it creates its handle. Operations that
    have no deterministic kernel warn (``warn_only``) rather than stop a long job; the training step of the core
    model uses none on CPU or CUDA (tests/gpu checks bit-exact resume).
    """
    if not enabled:
        return
    if device.type == "cuda":
        os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)


def init_distributed(device_choice: str, timeout_s: int, deterministic: bool = False) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a plain process gets world size 1.

    ``deterministic`` (``train.deterministic``) switches torch's deterministic algorithms on first
    (:func:`set_deterministic`)."""
    launch = LaunchEnv.read()
    device = pick_device(device_choice, launch.local_rank, launch.local_world_size)
    set_deterministic(deterministic, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size > 1 and not dist.is_initialized():
        # On GPUs, CPU tensors (exact int64 routing counts, agreed error messages) still need a backend: gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            os.environ.setdefault(NCCL_ERROR_HANDLING_ENV, NCCL_CLEAN_UP_ONLY)
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=device
    )


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
