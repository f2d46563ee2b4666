"""Launch real training jobs from tests: torchrun subprocesses or one plain process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"

# A model small enough that a few steps take about a second on two CPU ranks.
TINY = (
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=64",
    "model.max_seq_len=32",
    "moe.num_experts=4",
    "moe.expert_hidden=32",
    "data.seq_len=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.steps=4",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=4",
    "logging.tensorboard=false",
    "train.device=cpu",  # gloo ranks on the CPU even where a GPU is visible (tests/gpu is the GPU tier)
    "logging.plots=false",  # matplotlib's import and two figures: ~1.5 s a run; the tests of plots turn them on
    "checkpoint.every=0",
    "logging.log_every=1",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("EXPERTRAIN_TRACE_HOOKS", None)
    return env


Launcher = Literal["ranks", "torchrun"]
"""How a test starts ranks: ``ranks`` (tests/integration/ranks.py, no agent: ~3 s faster) or real ``torchrun``."""

RANKS = Path(__file__).with_name("ranks.py")


def train_command(
    config: Path | str, overrides: Sequence[str], nproc: int, launcher: Launcher = "ranks"
) -> list[str]:
    args = ["--config", str(config)]
    for o in overrides:
        args += ["--set", o]
    if nproc == 0:
        return [sys.executable, "-m", "framework.train", *args]
    if launcher == "ranks":
        return [sys.executable, str(RANKS), str(nproc), "-m", "framework.train", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "framework.train", *args,
    ]  # fmt: skip


def run_training(
    run_dir: Path,
    overrides: Sequence[str] = (),
    nproc: int = 2,
    config: Path | str = QUICKSTART,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    extra_path: Sequence[Path] = (),
    launcher: Launcher = "ranks",
) -> subprocess.CompletedProcess:
    """``nproc=0`` runs one plain process without torchrun; ``extra_path`` goes in front of PYTHONPATH."""
    cmd = train_command(config, [*TINY, f"run.dir={run_dir}", *overrides], nproc, launcher)
    full_env = {**_env(), **(env or {})}
    if extra_path:
        full_env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), full_env["PYTHONPATH"]])
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def start_training(
    run_dir: Path, overrides: Sequence[str] = (), nproc: int = 2, launcher: Launcher = "ranks"
) -> subprocess.Popen:
    cmd = train_command(QUICKSTART, [*TINY, f"run.dir={run_dir}", *overrides], nproc, launcher)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_when(
    proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240, poll: float = 0.01
) -> bool:
    """SIGKILL the launcher and every process below it as soon as ``condition()`` holds (a node dying); False if
    the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            kill_tree(proc)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    kill_tree(proc)
    raise TimeoutError("condition never held")


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and all its descendants. torchrun starts each worker in its own session, so killing the
    launcher's process group alone leaves the workers running (they may then finish the job behind the test)."""
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    for pid in victims[1:]:  # orphans are reparented; wait until they are really gone
        while Path(f"/proc/{pid}").exists() and "State:\tZ" not in _status(pid):
            time.sleep(0.01)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"


def prepare_dataset(
    root: Path, name: str, make_text: Callable[[int], str], docs: int = 60
) -> tuple[Path, Path]:
    """``expertrain data prepare`` on a generated JSONL file: returns (prefix, tokenizer folder). The command runs
    in this process (its entry point, ``framework.cli.main``): a fresh interpreter would add ~2.5 s of imports."""
    from framework.cli import main as cli_main

    source = root / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": make_text(i)}) + "\n" for i in range(docs)))
    prefix = root / "data" / name
    assert cli_main(["data", "prepare", "--input", str(source), "--output", str(prefix)]) == 0
    return prefix, Path(str(prefix) + ".tokenizer")


# --- launchers/ (tests/integration/test_launchers.py) ---------------------------------------------------------

LAUNCHERS = REPO / "launchers"


def set_args(overrides: Sequence[str]) -> list[str]:
    """``--set o`` for every override."""
    return [arg for o in overrides for arg in ("--set", o)]


def launcher_env(extra_path: Sequence[Path] = (), **extra: str) -> dict[str, str]:
    """The environment of a launcher script: this interpreter (``PYTHON``), ``extra_path`` in front of PYTHONPATH."""
    env = {**_env(), "PYTHON": sys.executable, **extra}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), env["PYTHONPATH"]])
    return env


def child_pids(pid: int) -> list[int]:
    """The direct children of process ``pid`` (Linux ``/proc``; a torchrun agent's children are its workers)."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in children.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


def wait_until(
    condition: Callable[[], bool], procs: Sequence[subprocess.Popen], timeout: float, poll: float = 0.01
) -> None:
    """Return as soon as ``condition()`` holds; AssertionError if one of ``procs`` ends first, TimeoutError."""
    deadline = time.time() + timeout
    while not condition():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"ended before the condition held: {ended}"
        if time.time() > deadline:
            raise TimeoutError("condition never held")
        time.sleep(poll)
