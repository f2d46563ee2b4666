"""What a run reports: each step's metrics line, and at the end ``summary.json``, the plots and the one-screen
summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from framework.comm import collectives as C
from framework.config import JobConfig
from framework.data import unigram_entropy
from framework.observe import console
from framework.observe.metrics import read_metrics
from framework.observe.mfu import mfu
from framework.train.run_state import StepResult

SUMMARY_FILE = "summary.json"


def step_record(
    step: int,
    result: StepResult,
    lr: float,
    tokens_seen: int,
    flops_per_token: float,
    peak_tflops: float | None,
    world_size: int,
) -> dict[str, Any]:
    """A step's line of ``metrics.jsonl`` (the trainer adds validation, routing and plugin metrics to it)."""
    tok_s = result.tokens / max(result.seconds, 1e-9)
    record: dict[str, Any] = {
        "step": step,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tok_s,
        "tokens_seen": tokens_seen,
        "model_tflops_per_s": flops_per_token * tok_s / 1e12,
    }
    step_mfu = mfu(flops_per_token, tok_s / world_size, peak_tflops)
    if step_mfu is not None:
        record["mfu"] = step_mfu
    record.update({f"loss/{k}": v for k, v in result.aux.items()})
    return record


def unigram_baseline(config: JobConfig, val_ds: Any) -> float | None:
    """The validation set's unigram entropy (rank 0 measures, every rank gets it); ``None`` for SFT or no
    validation set."""
    if val_ds is None or config.sft.train_files:
        return None
    return float(C.run_on_rank0("measuring the unigram baseline", lambda: unigram_entropy(val_ds)))


def build_summary(
    config: JobConfig,
    *,
    steps: int,
    tokens_seen: int,
    val_loss: float | None,
    baseline: float | None,
    train_seconds: float,
    steps_run: int,
    param_counts: dict[str, int],
    flops_per_token: float,
    peak_tflops: float | None,
    world_size: int,
    sample: str,
) -> dict[str, Any]:
    """The run's summary: ``steps`` done in all, ``steps_run`` of them by this process in ``train_seconds``."""
    tokens_per_s = (steps_run * config.train.global_batch_size * config.data.seq_len) / max(
        train_seconds, 1e-9
    )
    return {
        "run_dir": str(config.run_dir),
        "steps": steps,
        "tokens_seen": tokens_seen,
        "val_loss": val_loss,
        "unigram_entropy": baseline,
        "gap_below_unigram": None if val_loss is None or baseline is None else baseline - val_loss,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_per_s,
        "params_total": param_counts["total"],
        "params_active": param_counts["active_per_token"],
        "model_tflops_per_s": flops_per_token * tokens_per_s / 1e12,
        "mfu": mfu(flops_per_token, tokens_per_s / world_size, peak_tflops),
        "sample": sample,
        "lines": [],
    }


def add_exact_match(summary: dict[str, Any], accuracy: float | None, config: JobConfig) -> None:
    """Record the SFT exact-match accuracy (``None``: skipped) and its report line."""
    summary["exact_match"] = accuracy
    if accuracy is not None:
        summary["lines"].append(
            f"exact match     {accuracy:.3f} on {config.sft.eval_exact_match} rows of {config.sft.val_file} "
            "(greedy)"
        )


def write_report(summary: dict[str, Any], config: JobConfig, baseline: float | None) -> None:
    """Rank 0 draws the plots (``logging.plots``) and writes ``summary.json``; every rank prints the summary (the
    console shows rank 0's)."""
    run_dir = config.run_dir
    if C.rank() == 0:
        records = read_metrics(run_dir / "metrics.jsonl")
        if config.logging.plots:
            # Imported here: matplotlib costs ~0.6 s at start-up, and only rank 0 plots.
            from framework.observe.plots import plot_expert_load, plot_loss

            plot_loss(records, run_dir / "loss.png", baseline)
            plot_expert_load(records, run_dir / "expert_load.png")
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    console.info(format_summary(summary))


def previous_summary(run_dir: Path) -> dict[str, Any]:
    """The report a finished run wrote (``summary.json``), printed again."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    console.info(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The one-screen end-of-run report."""
    lines = [
        "",
        "=" * 72,
        f"run {s.get('run_dir', '')}: {s.get('steps')} steps, {s.get('tokens_seen', 0):,} tokens",
    ]
    if s.get("params_total"):
        lines.append(
            f"parameters      {s['params_total'] / 1e6:.2f}M total, {s['params_active'] / 1e6:.2f}M active per token"
        )
    if s.get("val_loss") is not None and s.get("unigram_entropy") is not None:
        lines.append(
            f"validation loss {s['val_loss']:.4f} nats (ppl {math.exp(min(s['val_loss'], 50)):.1f}); "
            f"unigram entropy {s['unigram_entropy']:.4f}; {s['gap_below_unigram']:.2f} nats below it"
        )
    if s.get("train_seconds"):
        lines.append(
            f"throughput      {s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.1f} s of steps, "
            f"{s['model_tflops_per_s'] * 1e3:.1f} model GFLOP/s"
            + (
                f", MFU {s['mfu']:.1%}"
                if s.get("mfu") is not None
                else " (MFU: set EXPERTRAIN_PEAK_TFLOPS on CPU)"
            )
        )
    lines.extend(s.get("lines", []))
    if s.get("sample"):
        lines.append("sample:")
        lines.extend("  | " + line for line in s["sample"].splitlines()[:12])
    lines.append("=" * 72)
    return "\n".join(lines)
