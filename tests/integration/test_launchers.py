"""launchers/ for real: local.sh on two ranks; a two-node job simulated with two torchrun agents on localhost that
survives a SIGKILLed worker (--max-restarts, auto-resume); a hung rank named within parallel.timeout_s; slurm.sbatch
against stand-in scontrol / srun commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from framework.comm.collectives import RankFailure, is_collective_failure
from framework.hooks import PluginHookError
from framework.parallel import watchdog
from framework.parallel.watchdog import check_window_s
from tests.distributed.spawn import free_port
from tests.integration.launch import (
    LAUNCHERS,
    QUICKSTART,
    REPO,
    TINY,
    child_pids,
    launcher_env,
    set_args,
    wait_until,
)

SCRIPTS = ("local.sh", "multinode.sh", "slurm.sbatch")
# 8 steps, a checkpoint every 2; no validation split (so no unigram baseline to compute at the end), no plots, no
# sample: each job's time is then mostly its processes' start-up.
JOB = (
    *TINY,
    "train.steps=8",
    "checkpoint.every=2",
    "data.val_fraction=0",
    "logging.plots=false",
    "train.sample_tokens=0",
)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_loss(run_dir: Path) -> float:
    return records(run_dir)[-1]["loss"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-rank run through launchers/local.sh (the elastic test compares against it)."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    proc = subprocess.run(
        [str(LAUNCHERS / "local.sh"), "2", str(QUICKSTART), *set_args([*JOB, f"run.dir={run_dir}"])],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_scripts_are_executable_bash_and_explain_their_usage() -> None:
    for name in SCRIPTS:
        path = LAUNCHERS / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert "set -euo pipefail" in path.read_text()
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
        bare = subprocess.run(
            ["bash", str(path)], capture_output=True, text=True, env=launcher_env(), timeout=30
        )
        assert bare.returncode == 2 and "usage:" in bare.stderr, (name, bare.stderr)
    missing = subprocess.run(
        ["bash", str(LAUNCHERS / "multinode.sh"), str(QUICKSTART)],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in launcher_env().items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR")},
    )  # fmt: skip
    assert missing.returncode == 2 and "NNODES is not set" in missing.stderr


def test_local_sh_trains_two_ranks(reference: Path) -> None:
    assert [r["step"] for r in records(reference)] == list(range(1, 9))
    assert json.loads((reference / "summary.json").read_text())["steps"] == 8
    assert (reference / "checkpoints" / "latest").read_text() == "step_00000008"


def test_slurm_sbatch_starts_one_torchrun_per_node(tmp_path: Path) -> None:
    """Stand-ins for scontrol and srun: the script's torchrun line, as srun would run it on every node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n'
    )
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = launcher_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SRUN_ARGS=str(tmp_path / "srun.txt"),
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_GPUS_ON_NODE="8",
        MAX_RESTARTS="2",
    )
    proc = subprocess.run(
        ["bash", str(LAUNCHERS / "slurm.sbatch"), "examples/configs/quickstart.yaml", "--set", "train.steps=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.txt").read_text().splitlines()
    assert args[: args.index(sys.executable)] == [
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    line = " ".join(args)
    for part in (
        f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc_per_node 8",
        "--rdzv-backend c10d --rdzv-endpoint gpu07:29500 --rdzv-id 4242 --max-restarts 2",
        "-m framework.train --config examples/configs/quickstart.yaml --set train.steps=3",
    ):
        assert part in line, (part, line)


def test_two_node_job_restarts_after_a_killed_worker_and_matches(tmp_path: Path, reference: Path) -> None:
    """Two torchrun agents (one process each) joined by a c10d rendezvous on localhost, --max-restarts=1: SIGKILL one
    worker once the step-4 checkpoint is in place; both agents restart their workers, which resume from it."""
    run_dir = tmp_path / "run"
    port = free_port()
    args = [str(LAUNCHERS / "multinode.sh"), str(QUICKSTART), *set_args([*JOB, f"run.dir={run_dir}"])]
    agents, logs = [], []
    for node in (0, 1):
        env = launcher_env(
            NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            MAX_RESTARTS="1", RDZV_ID=f"test-{port}",
        )  # fmt: skip
        out, err = tmp_path / f"node{node}.out", tmp_path / f"node{node}.err"
        logs.append((out, err))
        with open(out, "w") as o, open(err, "w") as e:
            agents.append(
                subprocess.Popen(args, cwd=REPO, env=env, stdout=o, stderr=e, start_new_session=True)
            )
    try:
        latest = run_dir / "checkpoints" / "latest"
        wait_until(lambda: latest.is_file() and latest.read_text() >= "step_00000004", agents, timeout=180)
        (worker,) = child_pids(agents[1].pid)
        os.kill(worker, signal.SIGKILL)
        killed_at = time.time()
        codes = [a.wait(timeout=180) for a in agents]
        restart_s = time.time() - killed_at
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    out = "".join(o.read_text() for o, _ in logs)
    assert codes == [0, 0], "".join(e.read_text()[-3000:] for _, e in logs)
    assert "resumed from" in out, out[-3000:]  # killed mid-run, not after the end
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    # Resume is deterministic (model, optimizer, data position, RNG): same loss as the uninterrupted run, to fp32
    # round-off at most (in practice bit-identical).
    assert final_loss(run_dir) == pytest.approx(final_loss(reference), rel=1e-6)
    print(f"restart and steps 5-8 after the kill: {restart_s:.1f} s")


HANG_PLUGIN = """
import os
import time

from framework.hooks import hookimpl


@hookimpl
def expertrain_step_begin(step):
    if step == 3 and os.environ.get("RANK") == "1":
        time.sleep(600)  # a rank that hangs: no error, no exit
"""


def test_a_hung_rank_is_named_within_the_timeout(tmp_path: Path) -> None:
    """A real plugin (entry point on an extra PYTHONPATH) sleeps on rank 1 at step 3; rank 0's next collective times
    out after parallel.timeout_s and the job fails with one line naming rank 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hang_plugin.py").write_text(HANG_PLUGIN)
    info = site / "hang_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hang-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[expertrain.plugins]\nhang = hang_plugin\n")

    # Short, since the test waits it out twice (the timeout, then the hung rank's grace after torchrun's SIGTERM), yet
    # far above any healthy collective of steps 1-2 on a loaded 2-core machine.
    timeout_s = 5
    run_dir = tmp_path / "run"
    overrides = [
        *JOB,
        "train.steps=6",
        f"run.dir={run_dir}",
        "plugins=[hang]",
        f"parallel.timeout_s={timeout_s}",
    ]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [str(LAUNCHERS / "local.sh"), "2", str(QUICKSTART), *set_args(overrides)],
            cwd=REPO, env=launcher_env(extra_path=[site]), stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda: metrics.is_file() and '"step": 2,' in metrics.read_text(), [proc], timeout=180)
        step2_done = time.time()
        workers = child_pids(proc.pid)
        code = proc.wait(timeout=timeout_s + 60)
        failed_after = time.time() - step2_done
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = err_path.read_text()
    assert code != 0
    expected = f"[rank 0] expertrain: error: a collective timed out after {timeout_s} s at step 3: rank 1 did not respond"
    assert any(line.startswith(expected) for line in stderr.splitlines()), stderr[-3000:]
    # The timeout, the rank check, then torchrun stops the hung rank: no process is left waiting.
    assert failed_after < timeout_s + check_window_s(timeout_s) + 15, failed_after
    assert len(workers) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    print(f"failed {failed_after:.1f} s after step 2 (parallel.timeout_s={timeout_s})")


GLOO_TIMEOUT = (
    "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation to complete"
)


def test_which_errors_are_failed_collectives() -> None:
    assert is_collective_failure(RuntimeError(GLOO_TIMEOUT))
    assert is_collective_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:26516"))
    cause = RuntimeError(GLOO_TIMEOUT)
    wrapped = PluginHookError("p", "expertrain_step_begin", cause)
    wrapped.__cause__ = cause  # as the plugin manager raises it: a plugin's hook that ran a collective
    assert is_collective_failure(wrapped)
    assert not is_collective_failure(
        RankFailure(f"rank 1 failed during loading: RuntimeError: {GLOO_TIMEOUT}")
    )
    assert not is_collective_failure(ValueError("timed out waiting for the data"))


def test_the_line_without_a_process_group() -> None:
    watchdog.reset()
    try:
        assert watchdog.explain(ValueError("boom")) is None
        assert watchdog.explain(RuntimeError(GLOO_TIMEOUT)) == (
            "a collective timed out after 10 s before the first step; which rank stopped responding is not known; "
            "if a rank is only slow, raise parallel.timeout_s"
        )
        watchdog.install(30)
        watchdog.note_step(7)
        assert watchdog.explain(RuntimeError(GLOO_TIMEOUT)).startswith(
            "a collective timed out after 30 s at step 7; which rank stopped responding is not known"
        )
        assert [check_window_s(t) for t in (1, 10, 60, 600)] == [2, 2.5, 15, 30]
    finally:
        watchdog.reset()
