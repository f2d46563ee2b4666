"""One full fine-tuning step, our trainer vs ``transformers.Trainer``, on the same model, weights, data and batch.

Models (``--models``): a llama-like decoder (``--dim`` 256, ``--layers`` 4, vocab 8192, GQA, SwiGLU) and a
qwen3_moe-like one (8 experts of width ``--dim``, top-2, q/k norms, no router aux loss), built by transformers from
a config with random weights and saved with ``save_pretrained`` (plus our tokenizer) to a temporary folder. Ours
loads it through ``model.init_from: hf:<folder>``; theirs with ``AutoModelForCausalLM.from_pretrained`` (SDPA).
Data: the generated SFT task (``python -m framework.data.sft_tasks``) built by
:func:`framework.data.sft.build_sft_datasets` on both sides: packed rows of ``--seq`` positions, loss on the answers
only, position ids restarting at every sample (attention masked between samples on both sides: ours from the
position ids, transformers by detecting the packed format from them). Both take the same rows in the same order,
one micro-batch of ``--batch`` rows per step (no accumulation), fp32, AdamW with the same lr, betas, eps and weight
decay (norms excluded on both sides), constant lr, gradient clipping at 1.0, loss = token mean over the batch.

Ours: :class:`framework.train.trainer.Trainer` built with :func:`framework.train.launch.load_job` in this process
(one rank) and stepped with ``train_step``. Theirs: ``transformers.Trainer`` (``use_cpu`` on CPU, sequential
sampler, no logging, saving or evaluation, its default optimizer unless ``--hf-optim``), fed a dataset of the same
``input_ids``/``position_ids`` and the already shifted labels as ``shift_labels``.

Checks before the numbers count: the first step's loss of both models on the first batch agrees (relative 1e-5),
and the first round's per-step losses of both trainers agree (relative 1e-4: same data and optimizer settings).

Time: ``--rounds`` rounds alternating ours and theirs; a round runs ``--warmup`` + ``--steps`` optimizer steps
(``Trainer.train`` again for theirs, with a fresh optimizer), and a step's time is the wall time between the ends
of consecutive steps (data, forward, loss, backward, clipping, AdamW, scheduler: all each trainer does per step)
over the last ``--steps`` steps of each round. Memory: each side runs again in a fresh child process, which reports
the growth of its resident set size sampled every millisecond over 3 steps after the model and data are built
(``PeakMemory`` of ``moe_layer.py``; glibc told to return freed blocks > 64 KiB): activations, gradients and AdamW
state (and, for transformers, what ``Trainer.train`` sets up). On CUDA it is ``torch.cuda.max_memory_allocated``
growth.

    python benchmarks/sft_step.py                # ~2 min on 2 CPU cores
    python benchmarks/sft_step.py --models llama --dim 128 --steps 2 --rounds 1   # a quick look

Writes ``benchmarks/results/sft_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("ours", "hf")
MEMORY_STEPS = 3
"""Steps a memory child runs: the first allocates gradients and AdamW state, the second reaches the peak."""


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_config(args: argparse.Namespace, model: str) -> Any:
    """The transformers config of ``model`` (``llama`` or ``qwen3_moe``) at the benchmark's shape."""
    from transformers import LlamaConfig, Qwen3MoeConfig

    common = {
        "vocab_size": args.vocab, "hidden_size": args.dim, "num_hidden_layers": args.layers,
        "num_attention_heads": args.dim // 64, "num_key_value_heads": max(1, args.dim // 128), "head_dim": 64,
        "max_position_embeddings": args.seq, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }  # fmt: skip
    if model == "llama":
        return LlamaConfig(**common, intermediate_size=int(args.dim * 8 / 3) // 32 * 32)
    # 8 experts, top-2, expert width dim: about the dense model's active FFN FLOPs. No router aux loss on either
    # side (transformers adds it only with output_router_logits, and defines it over all layers at once).
    return Qwen3MoeConfig(
        **common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=args.dim, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0, output_router_logits=False,
    )  # fmt: skip


def make_inputs(args: argparse.Namespace, model: str, folder: Path) -> None:
    """``folder/model``: a random ``model`` checkpoint with our tokenizer; ``folder/data``: the SFT JSONL."""
    import torch
    from transformers import AutoModelForCausalLM

    from framework.config.sections import DataConfig
    from framework.data.pretrain import load_tokenizer
    from framework.data.sft_tasks import main as make_task

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(args, model)).save_pretrained(folder / "model")
    load_tokenizer(DataConfig()).save(
        folder / "model"
    )  # data.tokenizer then defaults to the checkpoint folder
    # ~11 task samples fill a packed row of 256: enough rows that no side wraps around within a run.
    rows = 16 * args.batch * (args.warmup + args.steps) * args.rounds
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            make_task(["--output", str(folder / "data"), "--train", str(rows), "--val", "0", "--seed", "0"])
        finally:
            sys.stdout = stdout


def _sft_section(folder: Path) -> dict[str, Any]:
    return {"train_files": [str(folder / "data" / "train.jsonl")], "packing": True, "seed": 0}


def _optim(args: argparse.Namespace) -> dict[str, float]:
    return {"lr": args.lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0}


def build_ours(args: argparse.Namespace, folder: Path, steps: int) -> Any:
    """Our trainer, built (model from ``hf:<folder>/model``, SFT data, AdamW) and ready for ``train_step``."""
    import torch

    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    job = {
        "plugins": [],
        "model": {"init_from": f"hf:{folder / 'model'}", "max_seq_len": args.seq},
        "data": {"seq_len": args.seq},
        "sft": _sft_section(folder),
        "optim": {**_optim(args), "warmup_steps": 0, "min_lr_ratio": 1.0},  # constant lr, as theirs
        "train": {
            "steps": steps, "global_batch_size": args.batch, "micro_batch_size": args.batch, "seed": 0,
            "eval_every": 0, "sample_tokens": 0, "device": _device(),
        },
        "checkpoint": {"every": 0, "save_final": False, "resume": False},
        "logging": {"tensorboard": False, "progress": False, "plots": False},
        "run": {"dir": str(folder / "run")},
    }  # fmt: skip
    path = folder / "job.yaml"
    path.write_text(json.dumps(job), encoding="utf-8")  # JSON is YAML
    config, pm = load_job(str(path), [])
    trainer = Trainer(config, pm, DistInfo(0, 1, 0, torch.device(_device())))
    trainer.build()
    return trainer


class _HFItems:
    """The SFT rows as transformers' dicts: ``labels`` are already next-token targets, so they go in as
    ``shift_labels`` (used as given by ``ForCausalLMLoss`` and by the Trainer's token count); ``labels`` only tells
    the model to compute the loss."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        input_ids, labels, position_ids = self.dataset[i]
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "shift_labels": labels,
        }


def build_hf(args: argparse.Namespace, folder: Path, steps: int) -> Any:
    """``transformers.Trainer`` on the checkpoint and the same SFT rows, recording step ends and losses."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from framework.config.sections import SFTDataConfig
    from framework.data.sft import build_sft_datasets

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            _sync()
            ends.append(time.perf_counter())

    class LossTrainer(Trainer):
        def compute_loss(self, *a: Any, **k: Any) -> Any:
            loss = super().compute_loss(*a, **k)
            losses.append(float(loss.detach()))
            return loss

    ends: list[float] = []
    losses: list[float] = []
    dataset, _ = build_sft_datasets(SFTDataConfig(**_sft_section(folder)), folder / "model", args.seq)
    model = AutoModelForCausalLM.from_pretrained(
        folder / "model", dtype=torch.float32, attn_implementation="sdpa"
    )
    o = _optim(args)
    training_args = TrainingArguments(
        output_dir=str(folder / "hf"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=o["lr"], adam_beta1=o["beta1"], adam_beta2=o["beta2"],
        adam_epsilon=o["eps"], weight_decay=o["weight_decay"], max_grad_norm=o["grad_clip"],
        lr_scheduler_type="constant", warmup_steps=0, report_to=[], save_strategy="no", logging_strategy="no",
        eval_strategy="no", use_cpu=_device() == "cpu", dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, train_sampling_strategy="sequential", seed=0, dataloader_drop_last=True,
        **({"optim": args.hf_optim} if args.hf_optim else {}),
    )  # fmt: skip
    trainer = LossTrainer(
        model=model, args=training_args, train_dataset=_HFItems(dataset), callbacks=[Clock()]
    )
    trainer.bench_ends, trainer.bench_losses = ends, losses
    return trainer


def check_first_loss(ours: Any, hf: Any) -> tuple[float, float]:
    """Loss of both untrained models on the first batch (the first step's loss), checked equal."""
    import torch

    from framework.train.loss import count_loss_tokens, lm_loss_sum

    input_ids, labels, position_ids = ours.collate(
        [ours.train_ds[i] for i in range(ours.config.train.micro_batch_size)]
    )
    device = torch.device(_device())
    with torch.no_grad():
        logits = ours.model(input_ids.to(device), position_ids.to(device))
        l_ours = float(lm_loss_sum(logits, labels.to(device))) / count_loss_tokens(labels)
        batch = hf.data_collator([hf.train_dataset[i] for i in range(hf.args.per_device_train_batch_size)])
        out = hf.model(**{k: v.to(device) for k, v in batch.items()})
        l_hf = float(out.loss)
    # fp32, same math (SDPA with a document mask on both sides, RMSNorm and RoPE in another operation order):
    # ~1e-6 relative; a wrong mask, label shift or weight mapping moves the loss by far more.
    torch.testing.assert_close(torch.tensor(l_ours), torch.tensor(l_hf), rtol=1e-5, atol=0.0)
    return l_ours, l_hf


def run_ours(trainer: Any, n: int) -> tuple[list[float], list[float]]:
    """``n`` optimizer steps of our trainer: (step end times, losses)."""
    ends, losses = [], []
    start = trainer.state.step
    for step in range(start + 1, start + n + 1):
        result = trainer.train_step(step)
        _sync()
        ends.append(time.perf_counter())
        trainer.state.step = step
        losses.append(result.loss)
    return ends, losses


def run_hf(trainer: Any, n: int) -> tuple[list[float], list[float]]:
    """``n`` optimizer steps of transformers' Trainer (one ``train()`` call): (step end times, losses)."""
    trainer.args.max_steps = n
    trainer.bench_ends.clear()
    trainer.bench_losses.clear()
    trainer.train()
    return list(trainer.bench_ends), list(trainer.bench_losses)


def _memory_child(variant: str, args: argparse.Namespace, folder: str, queue: Any) -> None:
    """Build one side in this fresh process and report its peak memory growth over the steps."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from moe_layer import PeakMemory  # sampled RSS on CPU, allocator stats on CUDA

    torch.set_num_threads(args.threads)
    trainer = (build_ours if variant == "ours" else build_hf)(args, Path(folder), MEMORY_STEPS)
    with PeakMemory(torch.device(_device())) as mem:
        (run_ours if variant == "ours" else run_hf)(trainer, MEMORY_STEPS)
    queue.put((variant, mem.peak / 2**20))


def measure_memory(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Peak memory growth (MiB) of each side in a fresh process."""
    # glibc then returns every freed block > 64 KiB to the OS, so the sampled RSS tracks live memory.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    memory: dict[str, float] = {}
    for variant in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(variant, args, str(folder), queue))
        proc.start()
        name, mib = queue.get(timeout=600)
        proc.join()
        memory[name] = mib
    return memory


def bench_model(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Checks, step times and peak memory of both trainers on ``model``."""
    n = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="sft_step_") as tmp:
        folder = Path(tmp)
        make_inputs(args, model, folder)
        ours = build_ours(args, folder, args.rounds * n)
        hf = build_hf(args, folder, n)
        loss_ours, loss_hf = check_first_loss(ours, hf)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        trajectories: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for variant in VARIANTS:
                ends, losses = run_ours(ours, n) if variant == "ours" else run_hf(hf, n)
                times[variant] += [b - a for a, b in zip(ends[args.warmup - 1 : -1], ends[args.warmup :])]
                if r == 0:
                    trajectories[variant] = losses
        # Same weights, rows and AdamW settings: the same trajectory up to fp32 rounding that the updates amplify
        # (measured 6e-7 dense, 1.4e-5 MoE relative over 6 steps); 1e-4 catches a differing setting or batch.
        drift = max(
            abs(a - b) / abs(b) for a, b in zip(trajectories["ours"], trajectories["hf"], strict=True)
        )
        if drift > 1e-4:
            raise SystemExit(f"{model}: loss trajectories differ (max relative {drift:.2e}): {trajectories}")
        hf_optim = str(getattr(hf.args.optim, "value", hf.args.optim))
        hf_experts = getattr(hf.model.config, "_experts_implementation", None)
        fill = ours.train_ds.stats.fill
        params = ours.param_counts
        del ours, hf
        memory = measure_memory(args, folder)
    rows = {
        v: {
            "ms_min": 1e3 * min(times[v]),
            "ms_median": 1e3 * statistics.median(times[v]),
            "tokens_per_s_median": args.batch * args.seq / statistics.median(times[v]),
            "peak_growth_mib": memory[v],
        }
        for v in VARIANTS
    }
    return {
        "model": model,
        "params_total": params["total"],
        "params_active": params["active_per_token"],
        "hf_optimizer": hf_optim,
        "hf_experts_implementation": hf_experts,
        "first_step_loss": {"ours": loss_ours, "hf": loss_hf},
        "loss_trajectories_round1": trajectories,
        "max_relative_loss_drift_round1": drift,
        "packed_fill": fill,
        "step_seconds": times,
        "rows": rows,
        "time_ratio_ours_over_hf": rows["ours"]["ms_median"] / rows["hf"]["ms_median"],
        "time_ratio_ours_over_hf_min": rows["ours"]["ms_min"] / rows["hf"]["ms_min"],
        "memory_ratio_ours_over_hf": rows["ours"]["peak_growth_mib"]
        / max(rows["hf"]["peak_growth_mib"], 1e-9),
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """The markdown table and notes."""
    device = result["device"]
    memory_note = (
        "sampled RSS growth over the steps in a fresh process (approximate on CPU)"
        if device == "cpu"
        else "torch.cuda.max_memory_allocated growth"
    )
    models = result["models"]
    lines = [
        f"# Full fine-tuning step: our trainer vs transformers.Trainer ({device}, torch threads: {args.threads})",
        "",
        f"Models built by transformers from a config (dim {args.dim}, {args.layers} layers, vocab {args.vocab}; "
        "qwen3_moe: 8 experts of width dim, top-2, no router aux loss), `save_pretrained`, loaded by both (ours: "
        f"`model.init_from: hf:<folder>`). The generated SFT task packed to {args.seq} positions (loss on answers), "
        f"the same rows in the same order, batch {args.batch}, no accumulation; fp32; AdamW lr {args.lr:g}, betas "
        f"(0.9, 0.95), eps 1e-8, weight decay 0.1 (not on norms), constant lr, clip 1.0. transformers "
        f"{result['transformers']}, its optimizer `{models[0]['hf_optimizer']}`; ours `torch.optim.AdamW` "
        "(fused). Ours runs the LM head only at the positions that carry a label (the answers), transformers at "
        "every position: the same loss and gradients, less work.",
        "",
        f"Method: in one process, {args.rounds} rounds alternating ours (`Trainer.train_step`) and transformers "
        f"(`Trainer.train`); each round {args.warmup} untimed + {args.steps} timed steps; a step's time is the "
        "interval between consecutive step ends (data, forward, loss, backward, clip, AdamW, scheduler). Checked "
        "first: the first step's loss agrees (rtol 1e-5) and the round-1 loss trajectories agree (rtol 1e-4).",
        "",
        "| model | trainer | ms/step (min) | ms/step (median) | tokens/s (median) | peak memory growth (MiB) | "
        "first-step loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        for v in VARIANTS:
            r = m["rows"][v]
            lines.append(
                f"| {m['model']} | {'ours' if v == 'ours' else 'transformers'} | {r['ms_min']:.1f} | "
                f"{r['ms_median']:.1f} | {r['tokens_per_s_median']:,.0f} | {r['peak_growth_mib']:.1f} | "
                f"{m['first_step_loss'][v]:.5f} |"
            )
    lines += [
        "",
        "| model | time ours / transformers (median) | (min) | memory ours / transformers | loss drift (round 1) |",
        "|---|---|---|---|---|",
        *[
            f"| {m['model']} | {m['time_ratio_ours_over_hf']:.2f} | {m['time_ratio_ours_over_hf_min']:.2f} | "
            f"{m['memory_ratio_ours_over_hf']:.2f} | {m['max_relative_loss_drift_round1']:.1e} |"
            for m in models
        ],
        "",
        f"Memory: {memory_note}. 1-minute load average before / after: {result['load_average_1min'][0]:.1f} / "
        f"{result['load_average_1min'][1]:.1f} on {result['cpu_count']} cores"
        + (" (other jobs were running: times are noisy, compare ratios)." if device == "cpu" else "."),
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="llama,qwen3_moe", help="comma-separated: llama, qwen3_moe")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round and side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf-optim", default="", help="transformers' optim (default: its own default)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("llama", "qwen3_moe") for m in models):
        parser.error(f"--models takes llama and/or qwen3_moe, got {args.models!r}")
    if args.warmup < 1 or args.steps < 1:
        parser.error(
            "--warmup and --steps must be >= 1 (a step's time is measured from the previous step's end)"
        )

    import torch
    import transformers

    from framework.observe import console

    console.quiet_dependencies()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    per_model = [bench_model(args, m) for m in models]
    result = {
        "config": vars(args),
        "device": _device(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": per_model,
    }
    lines = report(args, result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sft_step.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (RESULTS / "sft_step.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
