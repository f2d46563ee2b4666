"""``benchmarks/reproduce.py --quick``: the whole reproduction pipeline (cached bases, task data, lr sweeps, the real
trainer, forgetting and exact-match evaluation, verdicts, report) on a minuscule setting, and its resume.

One subprocess runs every claim (no result is asserted: the numbers of 3-step runs mean nothing); a second one, after
one arm's cached file is removed, must rerun that arm alone and nothing else."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402


def _run(tmp_path: Path, jobs: int) -> str:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "reproduce.py"),
        "--quick",
        "--report",
        "--jobs",
        str(jobs),
    ]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "results")]
    cmd += ["--report-file", str(tmp_path / "results.md")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_suite_runs_every_claims_arms_and_resumes_only_what_is_missing(tmp_path: Path) -> None:
    first = _run(tmp_path, jobs=2)  # two worker processes
    report = (tmp_path / "results.md").read_text(encoding="utf-8")
    results = tmp_path / "results"
    for claim in reproduce.CLAIMS:
        assert f"`{claim.name}`" in report, claim.name
        for name, _, _ in reproduce.arm_variants(claim):
            runs = json.loads((results / claim.name / f"{name}-seed0.json").read_text(encoding="utf-8"))[
                "runs"
            ]
            assert len(runs) == reproduce.SCALES["quick"].n_lrs, (claim.name, name)  # the 2-lr sweep
            assert all(r["tokens_seen"] > 0 and r["val_loss"] > 0 for r in runs.values())
            if name.endswith("+head"):  # the adapter and the head train, not the whole model
                assert all(r["trained_params"] < r["params_total"] for r in runs.values()), (claim.name, name)
            assert re.search(rf"^\| {re.escape(name)} \| ", report, re.M), (claim.name, name)
        for comparison in claim.comparisons:  # every comparison has a verdict row
            assert f"{comparison.a} " in report and comparison.claim in report
    progress = re.findall(r"^\[(\w+)\] \d+/\d+ (\S+) lr", first, re.M)
    assert {c for c, _ in progress} == set(reproduce.CLAIMS_BY_NAME)
    for claim in reproduce.CLAIMS:  # each claim's wall time and run count, for the report's budget line
        (session,) = json.loads((results / claim.name / "timing.json").read_text(encoding="utf-8"))[
            "sessions"
        ]
        assert session["jobs"] == 2 and session["wall_seconds"] > 0
        trained = re.findall(rf"^\[{claim.name}\] \d+/\d+ .*; [\d.]+ s, ", first, re.M)
        assert session["runs"] == len(trained) > 0

    removed = results / "hft" / "hft-seed0.json"
    removed.unlink()
    stale = (
        results / "soka" / "soka-seed0.json"
    )  # one run whose job no longer is the arm's: rerun, not reported
    body = json.loads(stale.read_text(encoding="utf-8"))
    stale_lr = sorted(body["runs"])[0]
    body["runs"][stale_lr]["job"]["optim"]["weight_decay"] = 0.5
    stale.write_text(json.dumps(body), encoding="utf-8")
    kept = {p: p.stat().st_mtime_ns for p in results.rglob("*-seed0.json") if p != stale}
    second = _run(tmp_path, jobs=1)  # in this process
    assert sorted(re.findall(r"^\[(\w+)\] \d+/\d+ (\S+) lr (\S+)", second, re.M)) == sorted(
        [("hft", "hft", lr) for lr in json.loads(removed.read_text(encoding="utf-8"))["runs"]]
        + [("soka", "soka", stale_lr)]
    )
    assert (
        json.loads(stale.read_text(encoding="utf-8"))["runs"][stale_lr]["job"]["optim"]["weight_decay"] == 0.0
    )
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished arms were rewritten"


def test_a_sweep_grows_only_toward_the_edge_where_its_best_lr_sits() -> None:
    grid = [1.0, 2.0, 0.5, 4.0, 0.25]
    assert reproduce.next_lr(grid, [1.0, 2.0, 0.5], best=2.0) == 4.0  # best at the top: one value above
    assert reproduce.next_lr(grid, [1.0, 2.0, 0.5], best=0.5) == 0.25  # best at the bottom: one value below
    assert reproduce.next_lr(grid, [1.0, 2.0, 0.5], best=1.0) is None  # inside: the sweep is done
    assert reproduce.next_lr(grid, [1.0, 2.0, 0.5, 4.0], best=4.0) is None  # nothing beyond the grid's top


def test_the_arm_lr_is_the_finalist_of_the_lower_mean_over_seeds() -> None:
    def runs(**losses: float) -> dict[str, dict[str, float]]:
        return {k.replace("_", "."): {"val_loss": v} for k, v in losses.items()}

    sweep = runs(**{"0_01": 0.64, "0_003": 0.65, "0_001": 0.99})
    assert reproduce.finalists(sweep) == [0.01, 0.003]
    assert reproduce.choose_lr_over_seeds({0: sweep}) == 0.01  # one seed: its best
    # seed 0's best by a hair, unstable on the other seeds: the runner-up's mean is lower
    by_seed = {0: sweep, 1: runs(**{"0_01": 0.91, "0_003": 0.65}), 2: runs(**{"0_01": 0.79, "0_003": 0.76})}
    assert reproduce.choose_lr_over_seeds(by_seed) == 0.003
    by_seed[1]["0.003"]["val_loss"] = float("nan")  # a diverged seed counts as infinite
    assert reproduce.choose_lr_over_seeds(by_seed) == 0.01
    del by_seed[2]["0.01"]  # only the runner-up ran every seed
    by_seed[1]["0.003"]["val_loss"] = 0.65
    assert reproduce.choose_lr_over_seeds(by_seed) == 0.003


def test_every_arm_of_the_gpu_scale_is_a_valid_job(tmp_path: Path) -> None:
    """``--scale gpu`` cannot train here: every job it would run (bases, warm-up, each arm in each head protocol)
    passes the trainer's own checks (types, plugin sections, the one-rank layout, plugin validation)."""
    from framework.train.launch import load_job

    s = reproduce.SCALES["gpu"]
    base, task = tmp_path / "base", tmp_path / "task"
    jobs = [reproduce.base_job(n, s, tmp_path / n) for n in reproduce.BASE_RECIPES]
    jobs += [reproduce.chat_job(n, tmp_path / n, s, tmp_path / "chat", task) for n in reproduce.BASE_RECIPES]
    for claim in reproduce.CLAIMS:
        for _, arm, head in reproduce.arm_variants(claim):
            jobs.append(reproduce.arm_job(claim, arm, head, s, claim.lr, 1, tmp_path / "run", base, task))
    for job in jobs:
        config, _ = load_job("reproduce", [], raw=job, world=1)
        assert config.model.dim == s.dim and config.data.seq_len == s.seq_len


def test_a_note_is_shown_only_for_the_results_it_was_written_for() -> None:
    arm = {"lr": 1e-3, "seeds": 3, "val_loss": {"mean": 1.25}, "exact_match": {"mean": 0.5}}
    summary = {"arms": {"lora_r8": arm, "full": {**arm, "lr": 3e-4}}}
    notes = {"x": (reproduce.results_digest(summary), "Why: because.")}
    assert reproduce.claim_note("x", summary, notes) == ["", "Why: because."]
    changed = {"arms": {**summary["arms"], "full": {**arm, "lr": 3e-4, "val_loss": {"mean": 1.3}}}}
    (left_out,) = [line for line in reproduce.claim_note("x", changed, notes) if line]
    assert "Why" not in left_out and reproduce.results_digest(changed) in left_out
    assert reproduce.claim_note("y", summary, notes) == []
