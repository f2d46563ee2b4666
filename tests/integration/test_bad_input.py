"""Every bad input stops with one clear line, on every rank, without a hang and without losing work."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.launch import REPO, kill_tree, prepare_dataset, run_training, start_training


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # Another rank's progress bar may share the terminal line: keep the text from the rank prefix on.
    found = []
    for line in proc.stderr.splitlines():
        if "expertrain: error:" in line:
            start = line.find("[rank ")
            found.append(line[start:] if start >= 0 else line[line.index("expertrain: error:") :])
    return found


def assert_fails_on_every_rank(proc: subprocess.CompletedProcess, fragment: str, nproc: int = 2) -> None:
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == nproc, proc.stderr[-3000:]
    assert all(fragment in line for line in lines), lines
    assert {line.split("]")[0] for line in lines} == {f"[rank {r}" for r in range(nproc)}
    # No traceback from our code (torchrun's own agent prints a ChildFailedError traceback of itself).
    assert not re.search(r'File ".*framework[/\\]', proc.stderr), proc.stderr[-3000:]


def test_unknown_key_fails_on_every_rank_before_anything_starts(tmp_path: Path) -> None:
    # Not under torchrun: its agent stops the other ranks as soon as one exits, so on a loaded machine the slower
    # rank may be killed before it prints; tests/integration/ranks.py lets every rank finish its own error.
    proc = run_training(tmp_path / "run", ["train.stepz=3"], nproc=2, timeout=120)
    assert_fails_on_every_rank(proc, "config key 'train.stepz'")
    assert not (tmp_path / "run").exists(), "nothing is started for a bad config"


def test_wrong_type_and_bad_list_syntax(tmp_path: Path) -> None:
    proc = run_training(tmp_path / "a", ["train.steps=many"], nproc=0)
    assert proc.returncode == 1 and error_lines(proc) == [
        "expertrain: error: config key 'train.steps': got 'many'; expected an integer >= 1"
    ]
    proc = run_training(tmp_path / "b", ["data.paths=[x, y"], nproc=0)
    assert proc.returncode == 1 and "lists are written [a, b, c]" in error_lines(proc)[0]


def test_world_size_the_config_cannot_use(tmp_path: Path) -> None:
    proc = run_training(
        tmp_path / "run", ["train.global_batch_size=4", "train.micro_batch_size=1"], nproc=3, timeout=120
    )
    assert_fails_on_every_rank(proc, "multiple of data-parallel ranks (3)", nproc=3)


def test_parallel_layout_the_world_cannot_hold(tmp_path: Path) -> None:
    """tp=2 × ep=2 needs 4 ranks: on 2 every rank says which key to change, before any work starts."""
    proc = run_training(
        tmp_path / "run", ["parallel.data=fsdp", "parallel.tp=2", "parallel.ep=2"], nproc=2, timeout=120
    )
    assert_fails_on_every_rank(
        proc, "config key 'parallel.ep': got 2; expected a divisor of the data-parallel"
    )
    assert not (tmp_path / "run").exists()


def test_plugin_not_installed(tmp_path: Path) -> None:
    proc = run_training(tmp_path / "run", ["plugins=[no_such_plugin]"], nproc=0)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "no_such_plugin" in line and "installed" in line


def test_missing_data_path(tmp_path: Path) -> None:
    proc = run_training(
        tmp_path / "run", [f"data.paths=[{tmp_path / 'nothing'}]", f"data.tokenizer={tmp_path}"], nproc=0
    )
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "nothing" in line


def test_truncated_bin_and_idx(tmp_path: Path) -> None:
    prefix, tok = prepare_dataset(tmp_path, "small", lambda i: f"def f{i}(x):\n    return x * {i}\n" * 20)
    common = [f"data.paths=[{prefix}]", f"data.tokenizer={tok}", "model.vocab_size=8192"]
    for suffix in (".bin", ".idx"):
        f = Path(str(prefix) + suffix)
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        proc = run_training(tmp_path / f"run{suffix}", common, nproc=0)
        assert proc.returncode == 1, proc.stderr[-2000:]
        (line,) = error_lines(proc)
        assert f.name in line and "prepare" in line
        f.write_bytes(data)


# moe.shared_experts is a core key now (a change of it is refused as another model shape before any tensor is read);
# deepseek_moe.segments is the plugin's: 8 fine-grained experts (1 shared, 7 routed) become 4 (3).
DEEPSEEK = ["plugins=[deepseek_moe]", "moe.block=deepseek_moe", "moe.shared_experts=1", "train.steps=1"]


@pytest.fixture(scope="module")
def saved_deepseek_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-step run with a plugin MoE block (deepseek_moe, 2 segments); each test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    proc = run_training(run_dir, [*DEEPSEEK, "deepseek_moe.segments=2"], nproc=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_checkpoint_of_another_model_shape(tmp_path: Path, saved_deepseek_run: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(saved_deepseek_run, run_dir)
    proc = run_training(
        run_dir, [*DEEPSEEK, "deepseek_moe.segments=2", "train.steps=2", "model.dim=64"], nproc=0
    )
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert "model.dim: checkpoint 32, config 64" in line and "run.dir" in line


def test_checkpoint_of_a_plugin_block_with_other_options(tmp_path: Path, saved_deepseek_run: Path) -> None:
    """Plugin options can change tensor shapes: the resume is refused in one line naming tensors and options."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_deepseek_run, run_dir)
    proc = run_training(run_dir, [*DEEPSEEK, "deepseek_moe.segments=1", "train.steps=2"], nproc=0)
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert (
        "does not fit this job's model (layers.0.ffn.router.gate.weight: (7, 32) there, (3, 32) here" in line
    )
    assert "deepseek_moe.segments: 2 -> 1" in line and "checkpoint.resume=false" in line


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(
        run_dir,
        ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "checkpoint.every=1", "train.steps=6"],
        nproc=2,
    )
    assert proc.returncode != 0
    lines = error_lines(proc)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert lines and all(f"last good checkpoint ({latest}) is untouched" in line for line in lines)
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert meta["step"] == records[-1]["step"], "the checkpoint is the last finite step"
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_nan_loss_before_any_checkpoint_does_not_promise_one(tmp_path: Path) -> None:
    proc = run_training(
        tmp_path / "run",
        ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "train.steps=3"],
        nproc=0,
    )
    assert proc.returncode == 1
    (line,) = error_lines(proc)
    assert (
        "loss is" in line and "No checkpoint was saved before it" in line and "rerun from the start" in line
    )
    assert "last good checkpoint" not in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def _install_raising_plugin(site: Path) -> dict[str, str]:
    """A real plugin package found through entry points (a dist-info on PYTHONPATH) that raises in a hook."""
    (site / "boom_plugin.py").write_text(
        textwrap.dedent(
            """
            from framework.hooks import hookimpl

            @hookimpl
            def expertrain_step_begin(step):
                if step == 2:
                    raise ValueError("boom at step 2")
            """
        )
    )
    dist = site / "boom_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: boom-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[expertrain.plugins]\nboom = boom_plugin\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_plugin_raising_in_a_hook_names_plugin_and_hook(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    env = _install_raising_plugin(site)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "framework.train",
        "--config", str(REPO / "examples/configs/quickstart.yaml"),
    ]  # fmt: skip
    from tests.integration.launch import TINY

    for o in [*TINY, f"run.dir={tmp_path / 'run'}", "plugins=[boom]"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_fails_on_every_rank(proc, "plugin 'boom'")
    assert all("expertrain_step_begin" in line and "boom at step 2" in line for line in error_lines(proc))


def test_expertrain_train_takes_the_same_arguments(tmp_path: Path) -> None:
    """The console script (framework.cli:main) parses --config/--set exactly like python -m framework.train."""
    proc = subprocess.run(
        [sys.executable, "-m", "framework.cli", "train", "--config", str(REPO / "examples/configs/quickstart.yaml"),
         "--set", "train.steps=0", "--set", f"run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert error_lines(proc) == [
        "expertrain: error: config key 'train.steps': got 0; expected an integer >= 1"
    ]


def test_a_second_job_on_a_run_folder_in_use_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    """The first job holds run.dir while it trains; a second job there stops on every rank, naming the holder, and
    leaves the first job's config.yaml and metrics alone."""
    run_dir = tmp_path / "run"
    first = start_training(run_dir, ["train.steps=100000", "optim.lr=1e-4"], nproc=0)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.time() < deadline, "the first job never logged a step"
            time.sleep(0.1)
        config_before = (run_dir / "config.yaml").read_text()
        os.killpg(first.pid, signal.SIGSTOP)  # paused, lock still held: the second job gets the CPU
        second = run_training(run_dir, ["train.steps=3", "optim.lr=3e-4"], nproc=2, timeout=120)
        os.killpg(first.pid, signal.SIGCONT)
        assert_fails_on_every_rank(second, f"run folder {run_dir} is in use by another job (pid {first.pid}")
        assert first.poll() is None, "the first job keeps training"
        assert (run_dir / "config.yaml").read_text() == config_before
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
        assert steps == list(range(1, len(steps) + 1)), "only the first job's rows, each step once"
    finally:
        kill_tree(first)
