"""MoE variants at equal compute on the embedded corpus: plain top-k MoE vs DeepSeekMoE vs Chain-of-Experts, and
MoLA adapters vs full fine-tuning on the plain model's weights.

Every variant is the real trainer on the same data, seed, schedule and number of optimizer steps, with the same
*active expert FLOPs per token* (the ``MFLOPs per token`` each run prints is in the table):

- ``moe top-2/8``: 8 experts of hidden ``I``, top-2 (the baseline);
- ``deepseek_moe``: the same 8 experts cut in 2 (16 of hidden ``I/2``), 2 of them isolated as shared experts,
  top-2 of the 14 routed ones — 4 × ``I/2`` = 2 × ``I`` active, as DeepSeekMoE compares;
- ``chain_of_experts``: 2 iterations × top-1 of the same 8 experts (2 expert applications per token), inner residual,
  gates not renormalised (as the reference: with one expert a renormalised gate is always 1);
- ``mola`` (a fine-tuning method, so a second stage): from the baseline's final weights, ``--finetune-steps`` more
  steps of (a) full fine-tuning, (b) MoLA uniform and (c) MoLA inverted triangle (base frozen, adapters trained),
  compared by validation loss and trainable parameters.

    python benchmarks/moe_variants.py                     # ~15 min on 2 CPU cores
    python benchmarks/moe_variants.py --steps 40 --finetune-steps 20   # a quick look

Results go to ``benchmarks/results/moe_variants.{json,md,png}``. One seed: differences of a few hundredths of a nat
are within seed noise at this size (``--seeds 2`` repeats everything with another seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "quickstart.yaml"
RESULTS = REPO / "benchmarks" / "results"

MODEL = (
    "model.dim=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=352",
    "model.max_seq_len=128",
    "data.seq_len=128",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_hidden=192",
    "moe.experts_impl=grouped_mm",
    "parallel.data=fsdp",
)

PRETRAIN: list[tuple[str, tuple[str, ...]]] = [
    ("moe top-2/8", ()),
    (
        "deepseek_moe (2 shared + top-2/14, I/2)",
        (
            "plugins=[deepseek_moe]",
            "moe.block=deepseek_moe",
            "deepseek_moe.segments=2",
            "moe.shared_experts=2",
            "deepseek_moe.isolate_shared=true",
        ),
    ),
    (
        "chain_of_experts (2 × top-1/8)",
        (
            "plugins=[chain_of_experts]",
            "moe.block=chain_of_experts",
            "chain_of_experts.iterations=2",
            "moe.route_norm=false",  # top-1 per iteration: a renormalised gate would be 1, leaving routers no LM gradient
        ),
    ),
    (
        "chain_of_experts, outer residual (ablation)",
        (
            "plugins=[chain_of_experts]",
            "moe.block=chain_of_experts",
            "chain_of_experts.iterations=2",
            "chain_of_experts.residual=outer",
            "moe.route_norm=false",
        ),
    ),
]

# The base is all-MoE: its routed experts are fused weights, so MoLA adapts the attention projections.
ATTENTION = "q_proj, k_proj, v_proj, o_proj"
FINETUNE: list[tuple[str, tuple[str, ...]]] = [
    ("full fine-tuning", ()),
    ("mola uniform", ("plugins=[mola]", "mola.allocation=uniform", f"mola.targets=[{ATTENTION}]")),
    (
        "mola inverted triangle",
        ("plugins=[mola]", "mola.allocation=inverted_triangle", f"mola.targets=[{ATTENTION}]"),
    ),
]


def train(run_dir: Path, overrides: tuple[str, ...], steps: int, seed: int, nproc: int) -> dict:
    sets = [
        *MODEL,
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        f"train.eval_every={steps}",
        "train.eval_batches=16",
        "train.sample_tokens=0",
        "checkpoint.every=0",
        "logging.log_every=5",
        "logging.tensorboard=false",
        "logging.progress=false",
        *overrides,
    ]
    args = ["--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "framework.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        ours = [line for line in proc.stderr.splitlines() if "expertrain: error" in line]
        raise RuntimeError(
            f"{' '.join(overrides) or 'baseline'} failed:\n" + "\n".join(ours or [proc.stderr[-3000:]])
        )
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    records = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x
    ]
    model_line = next((x for x in proc.stdout.splitlines() if x.startswith("model:")), "")
    numbers = [float(v) for v in re.findall(r"([\d.]+)M", model_line)]
    mflops = re.search(r"([\d.]+) MFLOPs per token", model_line)
    return {
        "val_loss": summary["val_loss"],
        "unigram": summary.get("unigram_entropy"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "params_M": numbers[0] if numbers else None,
        "trainable_M": numbers[2] if len(numbers) > 2 else None,
        "mflops_per_token": float(mflops.group(1)) if mflops else None,
        "curve": [(r["step"], r["loss"]) for r in records if "loss" in r],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun)")
    parser.add_argument(
        "--only",
        default="",
        help="run only the variants whose name contains this text and merge them into the existing results "
        "(the fine-tuning stage needs the baseline: it is rerun when a fine-tuning variant is selected)",
    )
    args = parser.parse_args()

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            needs_base = any(args.only in name for name, _ in FINETUNE)
            for name, overrides in PRETRAIN:
                if args.only not in name and not (needs_base and name == PRETRAIN[0][0]):
                    continue
                run_dir = Path(tmp) / f"pre-{seed}-{len(results)}"
                row = {"stage": "pretrain", "variant": name, "seed": seed, "steps": args.steps}
                row.update(train(run_dir, overrides, args.steps, seed, args.nproc))
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                if name == PRETRAIN[0][0]:
                    base_dir = run_dir
            for name, overrides in FINETUNE:
                if args.only not in name:
                    continue
                run_dir = Path(tmp) / f"ft-{seed}-{len(results)}"
                row = {"stage": "finetune", "variant": name, "seed": seed, "steps": args.finetune_steps}
                ft = (f"model.init_from={base_dir}", "optim.warmup_steps=5", "optim.lr=2e-3", *overrides)
                row.update(train(run_dir, ft, args.finetune_steps, seed + 1000, args.nproc))
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = RESULTS / "moe_variants.json"
    if args.only and saved.is_file():  # keep the other variants' rows, in the script's order
        fresh = {(r["stage"], r["variant"], r["seed"]): r for r in results}
        old = {
            (r["stage"], r["variant"], r["seed"]): r for r in json.loads(saved.read_text(encoding="utf-8"))
        }
        merged = {**old, **fresh}
        order = [n for n, _ in PRETRAIN] + [n for n, _ in FINETUNE]
        results = sorted(
            merged.values(),
            key=lambda r: (
                r["stage"] != "pretrain",
                r["seed"],
                order.index(r["variant"]) if r["variant"] in order else 99,
            ),
        )
    saved.write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = render(results, args)
    (RESULTS / "moe_variants.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    plot(results, RESULTS / "moe_variants.png")
    return 0


def render(results: list[dict], args: argparse.Namespace) -> str:
    cores = os.cpu_count()
    lines = [
        f"Embedded corpus, 4 layers × dim 128, seq 128, global batch 16, {args.nproc} ranks (fsdp), {cores} CPU cores; "
        f"pretraining {args.steps} steps, fine-tuning {args.finetune_steps} steps from the baseline's weights.",
        "",
        "| stage | variant | seed | val loss | vs baseline | MFLOPs/token | params (M) | trainable (M) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in ("pretrain", "finetune"):
        for seed in sorted({r["seed"] for r in results}):
            rows = [r for r in results if r["stage"] == stage and r["seed"] == seed]
            if not rows:
                continue
            base = rows[0]["val_loss"]
            for r in rows:
                delta = r["val_loss"] - base
                lines.append(
                    f"| {stage} | {r['variant']} | {seed} | {r['val_loss']:.4f} | {delta:+.4f} | "
                    f"{r['mflops_per_token'] or float('nan'):.2f} | {r['params_M'] or float('nan'):.2f} | "
                    f"{r['trainable_M'] or float('nan'):.2f} | {r['tokens_per_s'] or float('nan'):.0f} |"
                )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, ("pretrain", "finetune")):
        for r in results:
            if r["stage"] == stage and r["seed"] == 0 and r["curve"]:
                steps, loss = zip(*r["curve"])
                ax.plot(steps, loss, lw=1.2, label=f"{r['variant']} (val {r['val_loss']:.3f})")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
