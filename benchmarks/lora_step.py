"""One LoRA training step, ours vs transformers + peft, on the same llama-like model, weights and batch.

Both sides: a dense decoder (``--dim`` 256, ``--layers`` 4, GQA, SwiGLU), LoRA r=16 / alpha=32 on q/k/v/o and
gate/up/down (all-linear), base frozen, fp32; a step is forward, cross-entropy, backward and AdamW on the adapters.
Ours is :class:`framework.models.Transformer` + the ``lora`` plugin's transform; theirs ``LlamaForCausalLM`` (SDPA
attention) + ``peft.get_peft_model``. The base weights are copied across (``hf_module_path`` names) and the adapters
too, and the first step's loss and adapter gradients are checked to agree before anything is timed.

Time: the variants alternate for ``--rounds`` rounds of ``--steps`` steps; the table shows the minimum and median
time per step and the ratio of the minima. Memory: each variant runs again in a fresh child process, which reports
the growth of its resident set size, sampled every millisecond over ``--steps`` steps after the model is built
(``PeakMemory`` of ``moe_layer.py``; glibc told to return freed blocks > 64 KiB): activations, gradients and Adam
state. On CPU this is an approximation (allocator slack counts; both sides pay it alike); on CUDA it is
``torch.cuda.max_memory_allocated`` growth.

    python benchmarks/lora_step.py                 # ~1 min on 2 CPU cores
    python benchmarks/lora_step.py --dim 128 --rounds 2   # a quick look

Writes ``benchmarks/results/lora_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Both models with identical base weights and adapters, their optimizers and one batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from framework.config.sections import ModelConfig, MoEConfig
    from framework.models import Transformer
    from plugins.peft.lora import LoRAConfig, adapter_parameter_names, apply_lora, lora_modules
    from plugins.peft.low_rank import hf_module_path

    cfg = ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=max(1, args.dim // 128),
        ffn_hidden=int(args.dim * 8 / 3) // 32 * 32, max_seq_len=args.seq,
    )  # fmt: skip
    ours = Transformer(cfg, MoEConfig(num_experts=0))
    ours.init_weights(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa",
        )
    )  # fmt: skip
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            module, _, leaf = name.rpartition(".")
            hf_params[f"{hf_module_path(module)}.{leaf}"].copy_(p)
    apply_lora(ours, LoRAConfig(targets=TARGETS, r=args.r, alpha=2.0 * args.r, seed=0))
    theirs = get_peft_model(hf, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, m in lora_modules(ours):
            hf_path = f"base_model.model.{hf_module_path(path)}"
            theirs_params[f"{hf_path}.lora_A.default.weight"].copy_(m.lora.lora_A)
            theirs_params[f"{hf_path}.lora_B.default.weight"].copy_(m.lora.lora_B)
    trainable = set(adapter_parameter_names(ours))
    for name, p in ours.named_parameters():
        p.requires_grad_(name in trainable)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    return {
        "ours": (ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)),
        "peft": (theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)),
        "batch": (ids[:, :-1], ids[:, 1:]),
        "trainable": {
            "ours": sum(p.numel() for p in ours.parameters() if p.requires_grad),
            "peft": sum(p.numel() for p in theirs.parameters() if p.requires_grad),
        },
    }


def step(variant: str, model: Any, optimizer: Any, batch: tuple[Any, Any]) -> float:
    import torch.nn.functional as F

    inputs, labels = batch
    logits = model(inputs) if variant == "ours" else model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def check(built: dict[str, Any]) -> float:
    """First-step losses and adapter gradients agree (before any step changes the adapters)."""
    import torch
    import torch.nn.functional as F

    inputs, labels = built["batch"]
    ours, theirs = built["ours"][0], built["peft"][0]
    l_ours = F.cross_entropy(ours(inputs).flatten(0, 1), labels.flatten())
    l_theirs = F.cross_entropy(theirs(input_ids=inputs).logits.float().flatten(0, 1), labels.flatten())
    l_ours.backward()
    l_theirs.backward()
    # fp32, same math: SDPA vs SDPA, RMSNorm and RoPE in another operation order, ~1e-6 relative.
    torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-5)
    g_ours = ours.layers[0].attention.q_proj.lora.lora_B.grad
    g_theirs = dict(theirs.named_parameters())[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ].grad
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
    return l_ours.item()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _memory_child(variant: str, args: argparse.Namespace, queue: Any) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from moe_layer import PeakMemory  # sampled RSS on CPU, allocator stats on CUDA

    torch.set_num_threads(args.threads)
    built = build(args, _device())
    model, optimizer = built[variant]
    del built["peft" if variant == "ours" else "ours"]  # only this variant's model stays alive
    with PeakMemory(torch.device(_device())) as mem:
        for _ in range(args.steps):  # the first step allocates the gradients and the Adam state
            step(variant, model, optimizer, built["batch"])
    queue.put((variant, mem.peak / 2**20))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    device = _device()
    built = build(args, device)
    loss0 = check(built)
    for variant in ("ours", "peft"):  # warm-up (allocator, kernels)
        step(variant, *built[variant], built["batch"])
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for _ in range(args.rounds):
        for variant in ("ours", "peft"):
            model, optimizer = built[variant]
            for _ in range(args.steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(variant, model, optimizer, built["batch"])
                if device == "cuda":
                    torch.cuda.synchronize()
                times[variant].append(time.perf_counter() - t0)
    trainable = built["trainable"]
    del built

    memory: dict[str, float] = {}
    # glibc then returns every freed block > 64 KiB to the OS, so the sampled RSS tracks live memory.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    for variant in ("ours", "peft"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(variant, args, queue))
        proc.start()
        name, mib = queue.get(timeout=600)
        proc.join()
        memory[name] = mib

    rows = [
        {
            "variant": v,
            "ms_min": 1e3 * min(times[v]),
            "ms_median": 1e3 * statistics.median(times[v]),
            "peak_growth_mib": memory[v],
            "trainable": trainable[v],
        }
        for v in ("ours", "peft")
    ]
    result = {
        "config": vars(args),
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "first_step_loss": loss0,
        "rows": rows,
        "time_ratio_ours_over_peft": rows[0]["ms_min"] / rows[1]["ms_min"],
        "memory_ratio_ours_over_peft": rows[0]["peak_growth_mib"] / max(rows[1]["peak_growth_mib"], 1e-9),
    }
    memory_note = (
        "sampled RSS growth over the steps in a fresh process (approximate on CPU)"
        if device == "cpu"
        else "torch.cuda.max_memory_allocated growth"
    )
    lines = [
        f"# LoRA step: ours vs transformers + peft ({device}, {args.threads} threads)",
        "",
        f"Llama-like dim {args.dim}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
        f"LoRA r={args.r} alpha={2 * args.r} on {', '.join(TARGETS)}; fp32; same weights, adapters and batch "
        f"(first-step losses agree: {loss0:.4f}). {args.rounds} rounds x {args.steps} steps, interleaved.",
        "",
        "| variant | ms/step (min) | ms/step (median) | peak memory growth (MiB) | trainable |",
        "|---|---|---|---|---|",
        *[
            f"| {r['variant']} | {r['ms_min']:.1f} | {r['ms_median']:.1f} | {r['peak_growth_mib']:.1f} | "
            f"{r['trainable']:,} |"
            for r in rows
        ],
        "",
        f"Ratios ours / peft: time {result['time_ratio_ours_over_peft']:.2f}, memory "
        f"{result['memory_ratio_ours_over_peft']:.2f}. Memory: {memory_note}.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora_step.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (RESULTS / "lora_step.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
