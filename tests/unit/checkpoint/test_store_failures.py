"""A save that fails leaves no temporary folder, keeps the previous checkpoint, and says why in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointStore
from framework.checkpoint.store import CheckpointSaveError
from tests.distributed.spawn import run_ranks

REPO = Path(__file__).resolve().parents[3]


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.unit.checkpoint.store_child", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_failed_cleanly(report: dict, cause: str) -> None:
    error = report["error"]
    assert error is not None and "\n" not in error
    assert (
        "step_00000002" in error and cause in error and "step_00000001 stays the latest checkpoint" in error
    )
    assert report["after_failure"] == ["latest", "step_00000001"], "the failed save left files behind"
    assert report["latest_after_failure"] == "step_00000001" and report["verify_step1"] is None
    assert report["latest_after_retry"] == "step_00000003", "the next save failed too"


def test_writes_past_the_file_size_limit_remove_the_temporary_folder_and_name_the_cause(
    tmp_path: Path,
) -> None:
    # RLIMIT_FSIZE of 1 MB in the saving process: its 4 MiB shard fails with EFBIG part-way, as on a full disk.
    report = _child(["limited", str(tmp_path), str(1_000_000)])
    _assert_failed_cleanly(report, "file too large")


def _can_mount_tmpfs(mount: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "none", str(mount)], capture_output=True
    )
    return probe.returncode == 0


def test_a_full_disk_removes_the_temporary_folder_and_says_no_space_left(tmp_path: Path) -> None:
    # A real full disk: a 2 MiB tmpfs mounted in a private mount namespace; step 2 needs 8 MiB.
    mount = tmp_path / "small"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) to mount a small tmpfs")
    child = " ".join([sys.executable, "-m", "tests.unit.checkpoint.store_child", "full", str(mount)])
    prefix = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m none {mount} && exec {child}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(prefix, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _assert_failed_cleanly(json.loads(proc.stdout.strip().splitlines()[-1]), "no space left on device")


def _fail_on_rank1(rank: int, world: int, root: str) -> list[str]:
    store = CheckpointStore(Path(root))
    state = {"model": {f"w{rank}": torch.arange(1000.0) + rank}}
    store.save(1, state, {}, {"cpu": torch.zeros(2)})
    # Rank 1's RNG "state" is not a tensor: its RNG file cannot be written, after every shard was.
    rng = {"cpu": torch.zeros(2)} if rank == 0 else {"cpu": "not a tensor"}
    try:
        store.save(2, state, {}, rng)  # type: ignore[dict-item]
    except CheckpointSaveError as exc:
        return [str(exc), *sorted(p.name for p in Path(root).iterdir())]
    return ["saved"]


def test_an_error_on_one_rank_fails_the_save_on_every_rank_and_removes_the_temporary_folder(
    tmp_path: Path,
) -> None:
    results = run_ranks(_fail_on_rank1, 2, str(tmp_path))
    for rank, (message, *listing) in enumerate(results):
        assert "could not save checkpoint step_00000002" in message and "step_00000001 stays" in message
        assert ("rank 1 failed" in message) == (rank == 0), message
        assert listing == ["latest", "step_00000001"]
    assert CheckpointStore(tmp_path).latest_verified("fail") == tmp_path / "step_00000001"
