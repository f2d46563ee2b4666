"""A process that saves checkpoints through the real store, for the tests that kill it or fill its disk.

``python -m tests.unit.checkpoint.store_child loop ROOT``: resume from the newest intact checkpoint under ROOT (or
start at step 0) and save steps after it forever, printing ``saved N`` after each save returns.
``... limited ROOT BYTES``: save step 1, then save step 2 under ``RLIMIT_FSIZE`` = BYTES (writes past it fail with
EFBIG), then save step 3 without the limit; prints one JSON line describing what happened.
``... full ROOT``: the same on a file system too small for step 2 (ROOT is a tiny tmpfs the test mounted).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from framework.checkpoint import CheckpointStore
from framework.checkpoint.store import CheckpointSaveError

# 8 Mi float32 values (32 MiB) in three tensors: a save takes about 0.4 s here, long enough to be killed
# at many points inside it.
BIG = 4 << 20


def expected_state(step: int, numel: int = BIG) -> dict[str, Any]:
    """The state saved at ``step``: values that differ at every step, regenerated bit-exactly from the step."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "model": {"w": torch.randn(numel, generator=gen), "b": torch.randn(numel // 2, generator=gen)},
        "optim": {"exp_avg": torch.randn(numel // 2, generator=gen), "lr": 1e-3 * step},
    }


def zeros_like_state(numel: int = BIG) -> dict[str, Any]:
    """A load target of the right shapes."""
    return {
        "model": {"w": torch.zeros(numel), "b": torch.zeros(numel // 2)},
        "optim": {"exp_avg": torch.zeros(numel // 2), "lr": 0.0},
    }


def save_step(store: CheckpointStore, step: int, numel: int = BIG) -> Path:
    return store.save(
        step, expected_state(step, numel), {"samples_consumed": step * 4}, {"cpu": torch.ones(3)}
    )


def loop(root: Path) -> None:
    store = CheckpointStore(root, keep_last=2)
    latest = store.latest_verified("fallback")
    step = CheckpointStore.read_meta(latest)["step"] if latest is not None else 0
    while True:
        step += 1
        save_step(store, step)
        print(f"saved {step}", flush=True)


def save_twice_around_a_failure(root: Path, limit: int | None) -> dict[str, Any]:
    """Step 1 saves; step 2 fails (file size limit, or a full disk); step 3 saves again once there is room."""
    store = CheckpointStore(root, keep_last=2)
    save_step(store, 1, numel=1024)
    report: dict[str, Any] = {}
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        save_step(store, 2, numel=1 << 20)
        report["error"] = None
    except CheckpointSaveError as exc:
        report["error"] = str(exc)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    report["after_failure"] = sorted(p.name for p in root.iterdir())
    report["latest_after_failure"] = (root / "latest").read_text()
    report["verify_step1"] = store.verify(root / "step_00000001")
    save_step(store, 3, numel=1024)
    report["latest_after_retry"] = store.latest_verified("fail").name
    return report


def main(argv: list[str]) -> None:
    mode, root = argv[0], Path(argv[1])
    if mode == "loop":
        loop(root)
    elif mode == "limited":
        print(json.dumps(save_twice_around_a_failure(root, int(argv[2]))), flush=True)
    elif mode == "full":
        print(json.dumps(save_twice_around_a_failure(root, None)), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
