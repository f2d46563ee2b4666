"""Scaling benchmark: the quickstart model trained in each parallel layout, side by side in one run.

For 1, 2 and 4 ranks (data, expert and tensor parallel and their products) it launches the real trainer under
torchrun with the same model and global batch, and reports

- tokens/s (median over the steps after ``--warmup``) and the ratio to one rank;
- the expert-parallel all-to-all volume per step and rank, summed over the MoE layers: (token, expert) rows sent to
  other ranks and the MB of one direction. Dropless dispatch sends exactly the routed pairs whose expert lives on
  another rank — the minimum any dispatcher must move, no padding — and the ratio to ``layers·T·k·(ep−1)/ep``
  (what uniform routing would send) shows how the router's choices fall between local and remote experts;
- on CUDA, bf16 tokens/s and MFU too; on CPU that part is skipped with a message (bf16 matmul is emulated there).

    python benchmarks/scaling.py                 # every layout, 8 steps each (~5 min on 2 CPU cores)
    python benchmarks/scaling.py --max-ranks 2   # 1 and 2 ranks only

Results go to ``benchmarks/results/scaling.{json,md,png}``. On a 2-core machine the 4-rank layouts oversubscribe the
cores (they show communication and scheduling cost, not speed-up); the table says how many cores the machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "configs" / "quickstart.yaml"
RESULTS = REPO / "benchmarks" / "results"

FSDP = ("parallel.data=fsdp",)
LAYOUTS: list[tuple[str, int, tuple[str, ...]]] = [
    ("1 rank", 1, ()),
    ("dp=2 (ddp)", 2, ("parallel.data=ddp",)),
    ("dp=2 (fsdp)", 2, FSDP),
    ("ep=2", 2, (*FSDP, "parallel.ep=2")),
    ("tp=2", 2, (*FSDP, "parallel.tp=2")),
    ("dp=4 (fsdp)", 4, FSDP),
    ("dp=2 × ep=2", 4, (*FSDP, "parallel.ep=2")),
    ("tp=2 × dp=2", 4, (*FSDP, "parallel.tp=2")),
    ("tp=2 × ep=2", 4, (*FSDP, "parallel.tp=2", "parallel.ep=2")),
]


def run_layout(nproc: int, overrides: tuple[str, ...], steps: int, dtype: str, run_dir: Path) -> list[dict]:
    sets = [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        f"train.dtype={dtype}",
        "data.val_fraction=0",
        "train.micro_batch_size=4",  # the same micro-batches in every layout (4 ranks need 16 / 4)
        "train.sample_tokens=0",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "logging.log_every=1",
        "logging.tensorboard=false",
        "logging.plots=false",
        "logging.progress=false",
        *overrides,
    ]
    args = ["--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "framework.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "framework.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        ours = [line for line in proc.stderr.splitlines() if "expertrain: error" in line or "Fatal" in line]
        raise RuntimeError(
            f"{' '.join(overrides) or '1 rank'} failed:\n" + "\n".join(ours or [proc.stderr[-3000:]])
        )
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarise(
    records: list[dict], warmup: int, ep: int, tokens_per_rank_step: int, top_k: int, moe_layers: int
) -> dict:
    steady = [r for r in records if r["step"] > warmup] or records
    out = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
    }
    if ep > 1:
        rows = statistics.median(r.get("moe/a2a_remote_rows", 0.0) for r in steady)
        uniform = moe_layers * tokens_per_rank_step * top_k * (ep - 1) / ep  # the metric sums the MoE layers
        out["a2a_rows"] = rows
        out["a2a_MB"] = statistics.median(r.get("moe/a2a_dispatch_MB", 0.0) for r in steady)
        out["a2a_vs_uniform"] = rows / uniform if uniform else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--max-ranks", type=int, default=4)
    args = parser.parse_args()

    import torch
    import yaml

    sys.path.insert(0, str(REPO))
    quick = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    gbs, seq = quick["train"]["global_batch_size"], quick["data"]["seq_len"]
    top_k, n_layers = quick["moe"]["top_k"], quick["model"]["n_layers"]
    from framework.config.sections import MoEConfig
    from framework.models.transformer import is_moe_layer

    moe_cfg = MoEConfig(**quick["moe"])
    moe_layers = sum(is_moe_layer(i, moe_cfg) for i in range(n_layers))
    cuda = torch.cuda.is_available()
    dtypes = ["fp32", "bf16"] if cuda else ["fp32"]
    if not cuda:
        print(
            "CPU: bf16 tokens/s and MFU are measured on CUDA only (bf16 matmul is emulated on most CPUs); skipped."
        )
    cores = os.cpu_count()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, overrides in LAYOUTS:
            if nproc > args.max_ranks or (cuda and nproc > torch.cuda.device_count()):
                continue
            ep = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.ep=")), 1)
            tp = next((int(o.split("=")[1]) for o in overrides if o.startswith("parallel.tp=")), 1)
            tokens_per_rank_step = (
                gbs * seq * tp // nproc
            )  # tokens a rank routes per step (sequence slices under tp)
            for dtype in dtypes:
                run_dir = Path(tmp) / f"{len(results)}"
                records = run_layout(nproc, overrides, args.steps, dtype, run_dir)
                row = {"layout": name, "ranks": nproc, "dtype": dtype}
                row.update(summarise(records, args.warmup, ep, tokens_per_rank_step, top_k, moe_layers))
                results.append(row)
                print(json.dumps(row), flush=True)
    base = {r["dtype"]: r["tokens_per_s"] for r in results if r["ranks"] == 1}
    for r in results:
        r["vs_1_rank"] = r["tokens_per_s"] / base[r["dtype"]] if r["dtype"] in base else None

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    header = (
        f"Quickstart model ({n_layers} layers, top-{top_k}), global batch {gbs} × {seq} tokens in micro-batches of 4, "
        f"{args.steps} steps (median after {args.warmup}), {cores} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if cuda else "")
    )
    lines = [
        header,
        "",
        "| layout | ranks | dtype | tokens/s | vs 1 rank | a2a rows/rank/step | a2a MB (one way) | vs uniform routing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a2a = (
            f"{r['a2a_rows']:.0f} | {r['a2a_MB']:.2f} | {r['a2a_vs_uniform']:.2f}"
            if "a2a_rows" in r
            else "– | – | –"
        )
        ratio = f"{r['vs_1_rank']:.2f}" if r["vs_1_rank"] is not None else "–"
        mfu = f" (MFU {r['mfu']:.1%})" if r.get("mfu") is not None else ""
        lines.append(
            f"| {r['layout']} | {r['ranks']} | {r['dtype']} | {r['tokens_per_s']:.0f}{mfu} | {ratio} | {a2a} |"
        )
    table = "\n".join(lines)
    (RESULTS / "scaling.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    _plot(results, RESULTS / "scaling.png", header)
    return 0


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fp32 = [r for r in results if r["dtype"] == "fp32"]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = {1: "#555555", 2: "#1f77b4", 4: "#ff7f0e"}
    ax.bar(range(len(fp32)), [r["tokens_per_s"] for r in fp32], color=[colors[r["ranks"]] for r in fp32])
    ax.set_xticks(range(len(fp32)), [r["layout"] for r in fp32], rotation=30, ha="right")
    ax.set_ylabel("tokens/s (fp32)")
    ax.set_title(title, fontsize=8)
    ax.legend(handles=[Patch(color=c, label=f"{n} rank{'s' if n > 1 else ''}") for n, c in colors.items()])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
