"""Every PEFT method against full fine-tuning and LoRA on one small task: score, forgetting, parameters, time, memory.

Each method fine-tunes the same pretrained base (``--base``, default ``runs/quickstart`` from ``make train``) with the
real trainer on the generated SFT task (``framework/data/sft_tasks.py``: add / reverse / upper / sort, chat turns,
loss on the answers), with the same steps, batch, sequence length, seed and schedule; only the learning rate (a
per-method table, printed, ``--lr METHOD=VALUE`` to override) and the method's own section differ. Per method:

- **exact match**: greedy answers to the first ``--eval-rows`` held-out rows (the trainer's ``sft.eval_exact_match``);
- **forgetting**: validation loss on the PRETRAINING corpus before (the base) and after the fine-tune, on the very
  batches the base run validated on (its data section, data.val_seed, ``train.eval_batches × micro_batch`` samples),
  each model rebuilt from its final checkpoint with its plugins (``framework.checkpoint.export.load_model``), fp32;
- **trained parameters**: what the method updates, from its start-up coverage line (HFT: its trained share, expert
  slices counted per expert; full fine-tuning: every parameter), and its share of the adapted model's total;
- **step time**: the median over steps 2..N of ``metrics.jsonl`` (``tokens_seen`` delta / ``tokens_per_s``);
- **peak memory**: the kernel's peak RSS of the training process (``wait4``; with ``--nproc 2`` the largest rank), so
  it includes the interpreter, the data and the exact-match evaluation. CPU numbers; on CUDA it is host memory.

One subprocess per method (clean peak RSS), one rank by default. Full size (the default: 300 steps, 200 scored rows)
takes about 70 minutes on 2 CPU cores (1.5-2.1 s per step at one rank, ~40 s of exact match and ~15 s of start-up
and forgetting evaluation per method), so it is not in ``make bench``:

    python benchmarks/peft_methods.py                                   # writes benchmarks/results/peft_methods.*
    python benchmarks/peft_methods.py --steps 3 --eval-rows 4 --train-rows 64 --val-rows 8   # a smoke test

The accuracy side of these methods (lr sweeps, several seeds, both head protocols, each paper's own comparison) is
``benchmarks/reproduce.py`` (``docs/results.md``); this script measures cost: trained parameters, step time, memory.
One seed: differences of a few points of exact match or a few hundredths of a nat are within seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Method:
    """One row of the comparison: the plugin (none for full fine-tuning), its section and its default peak lr."""

    name: str
    lr: float
    why: str
    plugin: str = ""
    section: dict[str, Any] = field(default_factory=dict)


# Learning rates at these settings (global batch 16 x 256 tokens, 10 warmup steps, cosine to 0.1x, no decay): the
# base was pretrained at 2e-3. Methods that update base weights (full, HFT, LIFT) or start from the base's principal
# components (CorDA, SoKA: the PiSSA family) take the full fine-tuning lr, as their papers do; zero-initialised
# low-rank deltas (LoRA) and tiny bottleneck adapters (Compacter) take a larger one.
METHODS: tuple[Method, ...] = (
    Method("full", 1e-3, "full fine-tuning: half the pretraining peak lr"),
    Method(
        "lora",
        2e-3,
        "zero-initialised low-rank delta: ~2-10x the full fine-tuning lr (Hu et al.; Biderman et al. 2024)",
        "lora",
        {"targets": "all-linear", "target_experts": True, "r": 8, "alpha": 16, "dropout": 0.0},
    ),
    Method(
        "hft",
        1e-3,
        "full-rank updates of half the weights: the full fine-tuning lr (HFT paper)",
        "hft",
        {"seed": 0, "stage_every": 0, "train_router": True},
    ),
    Method(
        "lift",
        1e-3,
        "the masked entries are base weights: the full fine-tuning lr (LIFT paper)",
        "lift",
        {
            "targets": "all-linear",
            "target_experts": True,
            "r": 16,
            "filter_rank": 32,
            "mask_type": "largest",
            "update_interval": 100,
        },
    ),
    Method(
        "corda",
        1e-3,
        "adapters hold the base's own components: the full fine-tuning lr (CorDA, as PiSSA)",
        "corda",
        # kpm: the calibration data is the pretraining corpus (the job's data section), whose knowledge is exactly
        # what the forgetting column measures: the paper's knowledge-preserved setting.
        {
            "targets": "all-linear",
            "target_experts": True,
            "r": 8,
            "alpha": 8,
            "mode": "kpm",
            "calibration_samples": 64,
        },
    ),
    Method(
        "soka",
        1e-3,
        "principal Kronecker terms of the base (PiSSA-style init): the full fine-tuning lr",
        "soka",
        {"targets": "all-linear", "target_experts": True, "energy": 0.9, "use_elbow": True, "max_rank": 8},
    ),
    Method(
        "compacter",
        3e-3,
        "the Compacter paper's lr for its PHM adapters",
        "compacter",
        {"variant": "compacter", "n": 4, "reduction_factor": 8, "train_norms": True, "seed": 0},
    ),
)
BY_NAME = {m.name: m for m in METHODS}


# --- one fine-tune -----------------------------------------------------------------------------------------------


def base_config(base: str) -> dict[str, Any]:
    """The resolved job of the base checkpoint (its ``model``, ``moe`` and ``data`` sections are reused)."""
    from framework.checkpoint.export import resolve_checkpoint
    from framework.checkpoint.store import CheckpointStore

    meta = CheckpointStore.read_meta(resolve_checkpoint(base))
    return {**meta["config"], "_world_size": int(meta.get("world_size", 1))}


def job_for(method: Method, lr: float, base: str, base_cfg: dict[str, Any], data_dir: Path, run_dir: Path,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """The job file of one fine-tune: the base's model, identical data, schedule and seed, the method's section."""
    job: dict[str, Any] = {
        "plugins": [method.plugin] if method.plugin else [],
        "model": {**base_cfg["model"], "init_from": base},
        "moe": base_cfg["moe"],
        "parallel": {"data": "ddp"},
        "data": {**base_cfg["data"], "seq_len": args.seq_len},
        "sft": {
            "train_files": [str(data_dir / "train.jsonl")],
            "val_file": str(data_dir / "val.jsonl"),
            "packing": True,
            "eval_exact_match": args.eval_rows,
        },
        "optim": {
            "lr": lr,
            "warmup_steps": min(10, args.steps // 10),
            "weight_decay": 0.0,
            "grad_clip": 1.0,
        },
        "train": {
            "steps": args.steps,
            "seed": args.seed,
            "global_batch_size": args.batch,
            "micro_batch_size": args.micro_batch,
            "eval_every": args.steps,
            "eval_batches": 4,
            "sample_tokens": 0,
        },
        "checkpoint": {"every": 0, "keep_last": 1, "save_final": True},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False, "plots": False},
        "run": {"dir": str(run_dir)},
    }
    if method.plugin:
        job[method.plugin] = dict(method.section)
    for target, key, value in args.set:
        if target in (method.name, "all"):
            section, _, leaf = key.partition(".")
            job.setdefault(section, {})[leaf] = yaml.safe_load(value)
    return job


def launch(job_file: Path, nproc: int, log: Path) -> tuple[int, float, float]:
    """Run the trainer on ``job_file`` in a child process; (exit code, peak RSS in MiB, wall seconds)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "framework.train", "--config", str(job_file)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "framework.train", "--config", str(job_file)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4: this child's own rusage; ru_maxrss (KiB on Linux) is the largest RSS of it and of the children it
        # reaped (torchrun's ranks), the kernel's high-water mark rather than a sample.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


_COVERAGE = re.compile(r"([\d,]+) trainable parameters = [\d.]+% of ([\d,]+)")  # lora, corda, lift, soka
_COMPACTER = re.compile(
    r"([\d,]+) adapter parameters \+ ([\d,]+) norm weights(?: \+ ([\d,]+) of .*?)? trained = [\d.]+% of ([\d,]+)"
)
_HFT = re.compile(r"hft: stage 0 .*?([\d.]+)% of the parameters trained")
# SoKA stores its factors at the rank cap; the rows past each layer's chosen rank are zero and never move.
_SOKA_IN_USE = re.compile(
    r"soka: decomposed .*?([\d,]+) trained entries in the rows in use of ([\d,]+) stored"
)


def trained_parameters(log_text: str, params_total: int) -> tuple[int, int, bool]:
    """(trained parameters, total parameters of the adapted model, whether the count is exact) from the method's
    start-up line; HFT prints its share to 0.1%, so its count is that share of the total, rounded to thousands."""
    if m := _COVERAGE.search(log_text):
        trained, total = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
        if soka := _SOKA_IN_USE.search(log_text):
            trained -= int(soka[2].replace(",", "")) - int(soka[1].replace(",", ""))
        return trained, total, True
    if m := _COMPACTER.search(log_text):  # adapters + norms (+ modules_to_save), of the total
        trained = sum(int(g.replace(",", "")) for g in (m[1], m[2], m[3]) if g)
        return trained, int(m[4].replace(",", "")), True
    if m := _HFT.search(log_text):
        return round(float(m[1]) / 100 * params_total, -3), params_total, False
    return params_total, params_total, True  # full fine-tuning: every parameter


def step_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Seconds of each optimizer step from ``metrics.jsonl`` written with ``logging.log_every=1``."""
    out, seen = [], 0
    for r in records:
        if "tokens_per_s" in r and "tokens_seen" in r:
            out.append((r["tokens_seen"] - seen) / max(r["tokens_per_s"], 1e-9))
            seen = r["tokens_seen"]
    return out


def fine_tune(method: Method, lr: float, base: str, base_cfg: dict[str, Any], data_dir: Path, work: Path,
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    run_dir = work / method.name
    job = job_for(method, lr, base, base_cfg, data_dir, run_dir, args)
    job_file = work / f"{method.name}.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    log = work / f"{method.name}.log"
    code, peak_mib, wall = launch(job_file, args.nproc, log)
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        ours = [line for line in text.splitlines() if "expertrain: error" in line]
        raise RuntimeError(f"{method.name} failed (exit {code}):\n" + "\n".join(ours or [text[-3000:]]))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x
    ]
    seconds = step_seconds(records)
    timed = seconds[1:] or seconds  # step 1 pays for first-call allocations
    trained, total, exact = trained_parameters(text, summary["params_total"])
    return {
        "method": method.name,
        "plugin": method.plugin or None,
        "section": job.get(method.plugin, {}) if method.plugin else {},
        "overrides": [f"{k}={v}" for t, k, v in args.set if t in (method.name, "all")],
        "lr": lr,
        "exact_match": summary.get("exact_match"),
        "task_val_loss": summary.get("val_loss"),
        "trained_params": int(trained),
        "trained_params_exact": exact,
        "total_params": total,
        "trained_pct": 100 * trained / max(total, 1),
        "step_s_median": statistics.median(timed) if timed else None,
        "train_seconds": summary.get("train_seconds"),
        "peak_rss_mib": peak_mib,
        "wall_seconds": wall,
        "run_dir": run_dir,
    }


# --- forgetting --------------------------------------------------------------------------------------------------


class PretrainingValidation:
    """The base run's own pretraining validation batches, built once and scored identically for every model."""

    def __init__(self, base_cfg: dict[str, Any]) -> None:
        import torch

        from framework.config import resolve
        from framework.data.pretrain import build_pretrain_datasets, load_tokenizer, split_inputs_labels
        from framework.hooks import PluginManager
        from framework.models import default_registry

        pm = PluginManager(default_registry())
        cfg = resolve({k: v for k, v in base_cfg.items() if not k.startswith("_")}, pm.config_sections,
                      source="the base checkpoint")  # fmt: skip
        t = cfg.train
        n_val = t.eval_batches * t.micro_batch_size
        tokenizer = load_tokenizer(cfg.data, progress=False)
        # The base trainer's exact call, so the samples are the ones its final val_loss was measured on.
        _, val = build_pretrain_datasets(
            cfg.data,
            cfg.data.seq_len,
            t.seed,
            t.steps * t.global_batch_size,
            n_val,
            tokenizer,
            val_seed=cfg.data.val_seed,
        )
        if val is None:
            raise SystemExit("the base's data section has no validation split (data.val_fraction is 0)")
        samples_BT = torch.stack([val[i] for i in range(n_val)])
        self.batches = [split_inputs_labels(b) for b in samples_BT.split(t.micro_batch_size)]
        self.tokens = n_val * cfg.data.seq_len

    def loss(self, checkpoint: str | Path) -> tuple[float, int]:
        """Mean next-token loss (nats) of the model of ``checkpoint`` (with its plugins) over the batches, and the
        model's parameter count."""
        import torch

        from framework.checkpoint.export import load_model
        from framework.train.loss import count_loss_tokens, lm_loss_sum

        model = load_model(checkpoint)[0]
        total, count = 0.0, 0
        with torch.no_grad():
            for input_ids, labels in self.batches:
                total += float(lm_loss_sum(model(input_ids), labels))
                count += count_loss_tokens(labels)
        model.discard_routing_state()
        return total / max(count, 1), sum(p.numel() for p in model.parameters())


# --- report ------------------------------------------------------------------------------------------------------


def settings_line(s: dict[str, Any]) -> str:
    return (
        f"base `{s['base']}` ({s['base_params'] / 1e6:.2f}M parameters); generated SFT task, {s['train_rows']} "
        f"training rows, exact match on {s['eval_rows']} held-out rows; {s['steps']} steps, global batch "
        f"{s['batch']} x {s['seq_len']} tokens (packed), seed {s['seed']}, {s['nproc']} rank(s), fp32, "
        f"{s['cpu_count']} CPU cores; forgetting on {s['forget_tokens']:,} tokens of the pretraining validation "
        f"split (base {s['base_pretrain_loss']:.4f} nats)"
    )


def table_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | lr | exact match | pretraining val loss after | forgetting (Δ nats) | trained params "
        "| trained % | step time (s, median) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        em = "n/a" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        step = "n/a" if r["step_s_median"] is None else f"{r['step_s_median']:.3f}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {em} | {r['pretrain_loss_after']:.4f} | {r['forgetting']:+.4f} | "
            f"{'' if r.get('trained_params_exact', True) else '~'}{r['trained_params']:,} | "
            f"{r['trained_pct']:.2f} | {step} | {r['peak_rss_mib']:.0f} |"
        )
    return lines


def render(result: dict[str, Any]) -> str:
    lines = [
        settings_line(result["settings"]),
        "",
        *table_rows(result["methods"]),
        "",
        "Method settings:",
        "",
    ]
    for r in result["methods"]:
        section = ", ".join(f"{k}={v}" for k, v in r["section"].items()) or "every parameter trained"
        if r.get("overrides"):
            section += f" (--set {', '.join(r['overrides'])})"
        lines.append(f"- `{r['method']}`: {section}; lr {r['lr']:g} ({r['lr_why']})")
    lines += [
        "",
        "Forgetting = pretraining validation loss after minus before (the base); trained % is of the adapted model's "
        "parameters; peak RSS is the training process's high-water mark (interpreter, data and exact-match "
        "evaluation included). One seed.",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["methods"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    for r in rows:
        ax.scatter(r["forgetting"], r["exact_match"] or 0.0, s=30)
        ax.annotate(r["method"], (r["forgetting"], r["exact_match"] or 0.0), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("forgetting: Δ pretraining val loss (nats)")
    ax.set_ylabel("exact match (held-out)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("task score vs forgetting (up-left is better)")
    ax.grid(alpha=0.3)
    axes[1].barh(names, [max(r["trained_pct"], 1e-4) for r in rows], color="tab:green")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("trained parameters (% of model)")
    axes[1].invert_yaxis()
    axes[2].barh(names, [r["step_s_median"] or 0.0 for r in rows], color="tab:orange")
    for i, r in enumerate(rows):
        axes[2].annotate(f"{r['peak_rss_mib']:.0f} MiB", (r["step_s_median"] or 0.0, i), fontsize=7,
                         xytext=(3, -3), textcoords="offset points")  # fmt: skip
    axes[2].set_xlim(0, 1.3 * max((r["step_s_median"] or 0.0 for r in rows), default=1.0))
    axes[2].set_xlabel("median step time (s); label: peak RSS")
    axes[2].invert_yaxis()
    for a in axes[1:]:
        a.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="runs/quickstart", help="pretrained run or checkpoint folder")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="global batch (packed rows)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-rows", type=int, default=4000, help="generated training rows")
    parser.add_argument("--val-rows", type=int, default=200, help="generated held-out rows")
    parser.add_argument("--eval-rows", type=int, default=200, help="held-out rows scored by exact match")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (2: torchrun, DDP)")
    parser.add_argument(
        "--lr", action="append", default=[], metavar="METHOD=VALUE", help="override a method's lr"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:SECTION.KEY=VALUE",
        help="override a job value for one method (or 'all'), e.g. corda:corda.mode=ipm",
    )
    parser.add_argument(
        "--work-dir", default="", help="keep the runs, logs and data here (default: a temp folder)"
    )
    parser.add_argument(
        "--output", default=str(RESULTS / "peft_methods"), help="results prefix (.json/.md/.png)"
    )
    args = parser.parse_args(argv)
    lrs = {m.name: m.lr for m in METHODS}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in lrs or not value:
            parser.error(f"--lr {item}: expected METHOD=VALUE with METHOD one of {', '.join(lrs)}")
        lrs[name] = float(value)
    args.lrs = lrs
    sets = []
    for item in args.set:
        target, _, rest = item.partition(":")
        key, _, value = rest.partition("=")
        if (target not in lrs and target != "all") or "." not in key or not value:
            parser.error(
                f"--set {item}: expected METHOD:SECTION.KEY=VALUE (METHOD one of {', '.join(lrs)} or all)"
            )
        sets.append((target, key, value))
    args.set = sets
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in BY_NAME]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(BY_NAME)}")
    if args.batch % (args.micro_batch * args.nproc):
        parser.error("--batch must be a multiple of --micro-batch x --nproc")
    if args.eval_rows > args.val_rows:
        parser.error("--eval-rows cannot exceed --val-rows")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from framework.data.sft_tasks import write_task

    try:
        base = str(Path(args.base).resolve())
        base_cfg = base_config(base)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}\n(train the base first: make train, or pass --base)") from None

    print("learning rates (peak, --lr METHOD=VALUE overrides):")
    for name in args.methods:
        print(f"  {name:10s} {args.lrs[name]:<8g} {BY_NAME[name].why}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data_dir = work / f"sft_task_{args.train_rows}_{args.val_rows}_{args.seed}"
        if not (data_dir / "val.jsonl").is_file():
            write_task(data_dir, args.train_rows, args.val_rows, args.seed)
        val = PretrainingValidation(base_cfg)
        before, base_params = val.loss(base)
        print(f"base: pretraining validation loss {before:.4f} nats on {val.tokens:,} tokens", flush=True)
        rows = []
        for name in args.methods:
            method = BY_NAME[name]
            row = fine_tune(method, args.lrs[name], base, base_cfg, data_dir, work, args)
            row["lr_why"] = method.why
            row["pretrain_loss_before"] = before
            row["pretrain_loss_after"] = val.loss(row.pop("run_dir"))[0]
            row["forgetting"] = row["pretrain_loss_after"] - before
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("section", "lr_why")}), flush=True)

    settings = {
        "base": args.base,
        "base_params": base_params,
        "steps": args.steps,
        "batch": args.batch,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "train_rows": args.train_rows,
        "eval_rows": args.eval_rows,
        "nproc": args.nproc,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "forget_tokens": val.tokens,
        "base_pretrain_loss": before,
    }
    result = {"settings": settings, "methods": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = render(result)
    output.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    plot(result, output.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
