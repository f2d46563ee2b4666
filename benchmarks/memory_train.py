"""The training parts of ``benchmarks/memory.py``: every rank's peak memory for one training step, 1 rank against
N ranks, side by side in one run.

- ``lora``: a LoRA step (all linear layers and the routed experts) on a ~0.6B-parameter qwen3_moe Hugging Face folder
  written by transformers (dim 1024, 6 layers, 32 experts of hidden 1024, top-4, vocab 8192, fp32), loaded with
  ``model.init_from: hf:<folder>``: 1 rank against 4 ranks (``parallel.data=fsdp``, ``parallel.ep=4``). The frozen
  base dominates: target at most 0.5 × the 1-rank peak per rank. Each rank also reports the bytes of tensor data it
  read from the folder (target: at most 1/N of the folder plus the replicated tensors).
- ``full``: full training (AdamW) of a 440M-parameter MoE (dim 1024, 8 layers, 32 experts of hidden 512, top-2,
  vocab 8192) from a fresh init at 1, 2 and 4 ranks (``parallel.data=fsdp``).

Each job runs ``benchmarks/rank_memory.py`` under torchrun: one optimizer step of 4 sequences × 128 tokens, then every
rank writes its ``VmHWM``. Peaks are resident set sizes: the safetensors files are memory-mapped, so the pages of the
folder a rank reads count in its peak while mapped (the 1-rank LoRA job maps the whole folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 1024**2

STEP = (
    "data.seq_len=128",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.steps=1",
    "data.val_fraction=0",
    "train.sample_tokens=0",
    "checkpoint.save_final=false",
    "logging.plots=false",
    "logging.progress=false",
    "logging.tensorboard=false",
)
FULL_MODEL = (
    "model.vocab_size=8192",
    "model.dim=1024",
    "model.n_layers=8",
    "model.n_heads=16",
    "model.n_kv_heads=4",
    "model.ffn_hidden=2048",
    "model.max_seq_len=128",
    "moe.num_experts=32",
    "moe.top_k=2",
    "moe.expert_hidden=512",
)
LORA_JOB = """plugins: [lora]
model:
  init_from: hf:{folder}
lora:
  targets: all-linear
  target_experts: true
  dropout: 0
"""
QWEN3_MOE = {
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1024,
    "max_position_embeddings": 512,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
}


def run_job(nproc: int, config: Path, overrides: tuple[str, ...], work: Path) -> list[dict[str, Any]]:
    """Every rank's report (peak RSS, bytes read) of one torchrun job."""
    out = work / f"ranks{nproc}"
    sets = [x for o in (*STEP, *overrides, f"run.dir={work / f'run{nproc}'}") for x in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(REPO / "benchmarks" / "rank_memory.py"), "--out", str(out), "--config", str(config), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-rank job failed:\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _row(label: str, reports: list[dict[str, Any]], one_rank_peak: float) -> dict[str, Any]:
    peak = max(r["peak_rss_mib"] for r in reports)
    row = {
        "job": label,
        "ranks": len(reports),
        "peak_rss_per_rank_mib": round(peak),
        "ratio_to_1_rank": round(peak / one_rank_peak, 2),
    }
    if reports[0].get("hf_bytes_read") is not None:
        row["hf_mb_read_per_rank"] = round(max(r["hf_bytes_read"] for r in reports) / MB)
    return row


def write_hf_folder(folder: Path) -> int:
    """A qwen3_moe folder written by transformers (random weights, seed 0); returns its parameter count."""
    code = (
        "import json, sys, torch\n"
        "from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM\n"
        "torch.manual_seed(0)\n"
        "m = Qwen3MoeForCausalLM(Qwen3MoeConfig(**json.loads(sys.argv[1])))\n"
        "m.save_pretrained(sys.argv[2])\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(QWEN3_MOE), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def lora_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = work / "qwen3_moe"
    params = write_hf_folder(folder)
    folder_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MB
    job = work / "lora.yaml"
    job.write_text(LORA_JOB.format(folder=folder))
    one = run_job(1, job, (), work)
    four = run_job(4, job, ("parallel.data=fsdp", "parallel.ep=4"), work)
    base = one[0]["peak_rss_mib"]
    rows = [_row("LoRA, 1 rank", one, base), _row("LoRA, fsdp × ep=4", four, base)]
    return {
        "title": "LoRA step on a Hugging Face qwen3_moe folder (model.init_from: hf:), peak RSS per rank",
        "setup": {"model": f"qwen3_moe, {params / 1e6:.0f}M parameters, fp32", "folder_mb": round(folder_mb)},
        "target": "4 ranks: at most 0.5 x the 1-rank peak per rank",
        "target_met": rows[1]["ratio_to_1_rank"] <= 0.5,
        "rows": rows,
    }


def full_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = REPO / "examples" / "configs" / "quickstart.yaml"
    runs = {n: run_job(n, config, (*FULL_MODEL, "parallel.data=fsdp"), work) for n in (1, 2, 4)}
    base = runs[1][0]["peak_rss_mib"]
    rows = [_row(f"full training, {n} rank{'s' if n > 1 else ''}", r, base) for n, r in runs.items()]
    return {
        "title": "full training (AdamW, fp32) of a 440M-parameter MoE, peak RSS per rank",
        "setup": {
            "model": "dim 1024, 8 layers, 32 experts (hidden 512, top-2), vocab 8192",
            "data": "parallel.data=fsdp",
        },
        "rows": rows,
    }
