"""A process SIGKILLed at many points of a real save always leaves an intact checkpoint holding exactly what was saved.

Each round restarts the saving process (tests/unit/checkpoint/store_child.py), which resumes from the newest intact
checkpoint and saves 32 MiB of tensors per step, and kills its process group at one point of its first save. SIGKILL tests
atomicity (what a crash of the process leaves); the fsyncs before each rename are what carry the same promise over a
power loss, which a test cannot cut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from framework.checkpoint import CheckpointStore
from framework.checkpoint.manifest import MANIFEST
from tests.unit.checkpoint.store_child import expected_state, save_step, zeros_like_state

REPO = Path(__file__).resolve().parents[3]

Marker = Callable[[Path, str], tuple[Path, ...]]
"""The files or folders whose appearance (any of them) is the kill point, for a checkpoint name under a checkpoints
folder."""


def _new_since(path: Path, started_ns: int) -> bool:
    """``path`` exists and was created or changed after ``started_ns``: a leftover of an earlier killed save (which
    the next save removes) does not count."""
    try:
        return path.stat().st_mtime_ns >= started_ns
    except OSError:
        return False


def _tmp(root: Path, name: str) -> tuple[Path, ...]:
    return (root / f"{name}.tmp",)


def _manifest(root: Path, name: str) -> tuple[Path, ...]:
    # The manifest lives in the temporary folder for only the moment before the rename: a poll that misses it sees
    # it in the renamed folder.
    return root / f"{name}.tmp" / MANIFEST, root / name / MANIFEST


def _renamed(root: Path, name: str) -> tuple[Path, ...]:
    return (root / name,)


def _latest(root: Path, name: str) -> tuple[Path, ...]:
    return (root / "latest",)


# (what the kill follows, the marker polled for, seconds slept after it, the steps it may resume from relative to
# the last complete one: 0 = that one, 1 = the one being saved): from the temporary folder's creation through the
# shards, the manifest and the rename to the ``latest`` pointer. Before the rename only the previous checkpoint is
# visible; after it, the new one is complete and synced, and is used even if ``latest`` still names the previous one.
KILL_POINTS: list[tuple[str, Marker, float, set[int] | None]] = [
    ("the temporary folder appears", _tmp, 0.0, {0}),
    # A timed kill can land after that save and the next have finished (a loaded machine): any intact checkpoint not
    # older than the last save that returned is right there.
    ("0.1 s after the temporary folder appears (shards being written)", _tmp, 0.1, None),
    ("0.25 s after the temporary folder appears (fsync, checksums)", _tmp, 0.25, None),
    ("the manifest is written", _manifest, 0.0, {0, 1}),
    ("the folder is renamed", _renamed, 0.0, {1}),
    ("latest is replaced", _latest, 0.0, {1}),
]


def _wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (
            f"the saving process ended early: {proc.stdout.read() if proc.stdout else ''}"
        )
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)


def _kill_round(root: Path, resumed: int, marker: Marker, delay: float) -> int:
    """Start the saver, kill it at ``marker`` (+``delay``) during its first save (step ``resumed + 1``); returns
    the last step whose save had returned."""
    started_ns = time.time_ns()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.checkpoint.store_child", "loop", str(root)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    targets = marker(root, f"step_{resumed + 1:08d}")
    try:
        _wait_for(proc, lambda: any(_new_since(target, started_ns) for target in targets))
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved ")]
    return max(saved, default=resumed)


def test_sigkill_at_every_point_of_a_save_resumes_from_an_intact_checkpoint_with_the_saved_tensors(
    tmp_path: Path,
) -> None:
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root)
    save_step(store, 1)
    resumed = 1
    outcomes = []
    for label, marker, delay, allowed in KILL_POINTS:
        saved = _kill_round(root, resumed, marker, delay)
        # "fail": a kill must never leave a visible checkpoint that does not verify.
        path = store.latest_verified("fail")
        assert path is not None, f"killed after {label}: no checkpoint"
        step = CheckpointStore.read_meta(path)["step"]
        assert step >= saved, f"killed after {label}: step {saved} had been saved, resumed from {step}"
        assert allowed is None or step - resumed in allowed, (
            f"killed after {label}: resumed from step {step}, the last was {resumed}"
        )
        state, meta, rng = CheckpointStore.load(path, zeros_like_state())
        expected = expected_state(step)
        for group in ("model", "optim"):
            for key, value in expected[group].items():
                got = state[group][key]
                same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
                assert same, f"killed after {label}: {group}.{key} of step {step} differs from what was saved"
        assert meta["samples_consumed"] == step * 4 and torch.equal(rng["cpu"], torch.ones(3))
        outcomes.append((label, step))
        resumed = step
    # Both outcomes occur: killed before the rename, the previous step; after it, the new one.
    assert {step - prev for (_, step), prev in zip(outcomes, [1] + [s for _, s in outcomes])} >= {0, 1}
