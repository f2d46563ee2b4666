"""Training throughput and MFU in bf16 on one GPU: our Transformer against the anchors a user would pick.

Runs (each a full training step: bf16 autocast forward, cross-entropy, backward, fused AdamW on fp32 master weights):

- ``dense``: a ~1.1B llama-shaped model (TinyLlama's shape: dim 2048, 22 layers, 32 query / 4 key-value heads,
  SwiGLU 5632, vocabulary 32000), activation checkpointing off/on x torch.compile (per block) off/on;
- ``moe``: 16 experts, top-2, grouped GEMM (``experts_impl: auto`` on CUDA), dim 2048, 16 layers, expert SwiGLU 1408:
  0.61B active / 2.5B total parameters — the largest top-2-of-16 model whose fp32 weights, gradients and AdamW state
  (16 bytes a parameter, 41 GB) leave room for activations on an 80 GB H100; same four settings;
- ``reference``: the dense shape written as plain ``torch.nn.functional`` (F.linear, F.scaled_dot_product_attention,
  F.rms_norm, F.silu; no RoPE, no framework code), eager and compiled: the MFU ceiling a hand-written model reaches;
- ``moe block``: one MoE layer of the ``moe`` shape, forward + backward on the same tokens, ours (grouped GEMM)
  against transformers' ``MixtralSparseMoeBlock`` with the same weights (its ``grouped_mm`` and ``eager`` experts)
  and a dense SwiGLU of equal active FLOPs (benchmarks/moe_layer.py's builders and output check).

Figures: warm-up steps (compilation included) are excluded; the timed steps run back to back between two CUDA
synchronisations; tokens/s = tokens per step / mean step time. MFU = model FLOPs per token (``flops_per_token``, the
PaLM formula: 6 x matmul parameters + full, not causal-halved, attention) x tokens/s / the bf16 dense peak of
framework/observe/mfu.py. Goals (issue 15, one H100): >= 45% MFU dense, >= 35% MoE.

    python benchmarks/gpu_throughput.py                   # one GPU; writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu_throughput.py --quick           # tiny shapes, any device, seconds; writes under runs/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from framework.config.sections import ModelConfig, MoEConfig  # noqa: E402
from framework.models.transformer import Transformer  # noqa: E402
from framework.observe.mfu import mfu, peak_tflops  # noqa: E402

GOALS = {"dense": 0.45, "moe": 0.35}


@dataclass(frozen=True)
class Spec:
    """A model shape and the batch it trains on."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab: int
    seq: int
    batch: int
    experts: int = 0
    top_k: int = 2
    expert_hidden: int = 0

    def model_cfg(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn_hidden,
            max_seq_len=self.seq,
        )

    def moe_cfg(self) -> MoEConfig:
        return MoEConfig(num_experts=self.experts, top_k=self.top_k, expert_hidden=max(self.expert_hidden, 1))


FULL = {
    "dense": Spec(2048, 22, 32, 4, 5632, 32000, seq=2048, batch=8),
    "moe": Spec(2048, 16, 16, 8, 5632, 32000, seq=2048, batch=8, experts=16, top_k=2, expert_hidden=1408),
}
QUICK = {  # moe_layer.py's quick MoE shape (at smaller ones bf16 near-ties fail its output check)
    "dense": Spec(128, 2, 4, 2, 256, 512, seq=256, batch=2),
    "moe": Spec(128, 2, 4, 2, 256, 512, seq=256, batch=2, experts=4, top_k=2, expert_hidden=256),
}


def model_stats(spec: Spec) -> dict[str, float]:
    """Parameter counts and training FLOPs per token, from our model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(spec.model_cfg(), spec.moe_cfg())
    counts = model.param_counts()
    return {
        "params_total": counts["total"],
        "params_active": counts["active_per_token"],
        "flops_per_token": model.flops_per_token(spec.seq),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[float, Any]:
    """Mean seconds per step over ``steps`` after ``warmup`` untimed ones, and what the last step returned (a loss
    tensor is read only after the clock stops: reading it earlier would synchronise every step)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    last = None
    for _ in range(steps):
        last = step()
    sync(device)
    return (time.perf_counter() - start) / steps, last


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _batch(spec: Spec, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, spec.vocab, (spec.batch, spec.seq + 1), generator=g).to(device)


def ours_step(
    spec: Spec, device: torch.device, checkpointing: bool, compiled: bool
) -> Callable[[], torch.Tensor]:
    """One training step of our Transformer (:func:`adamw_step`), blocks checkpointed and/or compiled as the trainer
    does it (``train.activation_checkpointing``, ``train.compile``)."""
    with torch.device(device):
        model = Transformer(spec.model_cfg(), spec.moe_cfg())
    random_init_(model.parameters(), device)
    if checkpointing:
        model.enable_activation_checkpointing()
    if compiled:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block)
    moe_layers = [m for m in model.modules() if hasattr(m, "pop_aux_losses")]

    def aux_losses() -> torch.Tensor | float:
        return sum((v for layer in moe_layers for v in layer.pop_aux_losses().values()), 0.0)

    def forget_counts() -> None:
        for layer in moe_layers:
            layer.consume_expert_counts()

    return adamw_step(model, list(model.parameters()), spec, device, aux_losses, forget_counts)


def adamw_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    spec: Spec,
    device: torch.device,
    aux_losses: Callable[[], torch.Tensor | float] = lambda: 0.0,
    after: Callable[[], None] = lambda: None,
) -> Callable[[], torch.Tensor]:
    """One training step as the trainer runs it: bf16 autocast forward, cross-entropy (+ the MoE aux losses),
    backward, fused AdamW on the fp32 weights; returns the loss (a tensor: reading it would synchronise)."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = _batch(spec, device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.view(-1, spec.vocab), ids[:, 1:].reshape(-1)) + aux_losses()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after()
        return loss.detach()

    return step


@torch.no_grad()
def random_init_(params: Any, device: torch.device) -> None:
    """N(0, 0.02) matrices and unit norm weights, drawn on ``device``: the values do not change the work, and
    framework's keyed init (drawn on the CPU so that every layout gets the same values) takes seconds a billion
    parameters, which the time budget cannot spare."""
    g = torch.Generator(device).manual_seed(0)
    for p in params:
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0)


class FunctionalLlama:
    """The dense shape in plain ``torch.nn.functional``: what a user writes by hand, the ceiling for MFU."""

    def __init__(self, spec: Spec, device: torch.device) -> None:
        self.spec = spec
        D, F_, hd = spec.dim, spec.ffn_hidden, spec.dim // spec.n_heads

        def weight(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, requires_grad=True)

        def ones(n: int) -> torch.Tensor:
            return torch.empty(n, device=device, requires_grad=True)

        self.embedding = weight(spec.vocab, D)
        self.layers = [
            {
                "attn_norm": ones(D),
                "wq": weight(spec.n_heads * hd, D),
                "wk": weight(spec.n_kv_heads * hd, D),
                "wv": weight(spec.n_kv_heads * hd, D),
                "wo": weight(D, spec.n_heads * hd),
                "ffn_norm": ones(D),
                "w_gate": weight(F_, D),
                "w_up": weight(F_, D),
                "w_down": weight(D, F_),
            }
            for _ in range(spec.n_layers)
        ]
        self.norm = ones(D)
        self.output = weight(spec.vocab, D)
        self.block: Callable[..., torch.Tensor] = self._block
        random_init_(self.parameters(), device)

    def parameters(self) -> list[torch.Tensor]:
        return [self.embedding, *(w for layer in self.layers for w in layer.values()), self.norm, self.output]

    def _block(self, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.spec
        B, S, D = h.shape
        hd = D // s.n_heads
        x = F.rms_norm(h, (D,), w["attn_norm"], 1e-5)
        q = F.linear(x, w["wq"]).view(B, S, s.n_heads, hd).transpose(1, 2)
        k = F.linear(x, w["wk"]).view(B, S, s.n_kv_heads, hd).transpose(1, 2)
        v = F.linear(x, w["wv"]).view(B, S, s.n_kv_heads, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + F.linear(a.transpose(1, 2).reshape(B, S, D), w["wo"])
        x = F.rms_norm(h, (D,), w["ffn_norm"], 1e-5)
        return h + F.linear(F.silu(F.linear(x, w["w_gate"])) * F.linear(x, w["w_up"]), w["w_down"])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(ids, self.embedding)
        for w in self.layers:
            h = self.block(h, w)
        return F.linear(F.rms_norm(h, (self.spec.dim,), self.norm, 1e-5), self.output).float()


def reference_step(spec: Spec, device: torch.device, compiled: bool) -> Callable[[], torch.Tensor]:
    model = FunctionalLlama(spec, device)
    if compiled:
        model.block = torch.compile(model._block)
    return adamw_step(model, model.parameters(), spec, device)


def measure(
    name: str,
    spec: Spec,
    make_step: Callable[[Spec], Callable[[], torch.Tensor]],
    device: torch.device,
    args: argparse.Namespace,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One row: build, warm up, time; on out-of-memory, once more at half the batch."""
    stats = model_stats(spec)
    row: dict[str, Any] = {"run": name, **settings, "batch": spec.batch, "seq": spec.seq, **stats}
    out_of_memory = False
    try:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, last_loss = time_steps(make_step(spec), device, args.warmup, args.steps)
        loss = float(last_loss)
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the exception (whose frames hold the model) is gone
    if out_of_memory:
        release(device)
        if spec.batch == 1:
            return {**row, "error": "out of memory at batch 1"}
        print(f"  {name}: out of memory at batch {spec.batch}; trying {spec.batch // 2}", flush=True)
        return measure(name, replace(spec, batch=spec.batch // 2), make_step, device, args, settings)
    tokens_per_s = spec.batch * spec.seq / seconds
    peak = peak_tflops(device, "bf16")
    row.update(
        step_ms=seconds * 1e3,
        tokens_per_s=tokens_per_s,
        model_tflops_per_s=stats["flops_per_token"] * tokens_per_s / 1e12,
        mfu=mfu(stats["flops_per_token"], tokens_per_s, peak),
        peak_memory_gb=peak_memory_gb(device),
        last_loss=loss,
    )
    assert math.isfinite(loss), f"{name}: loss {loss}"
    release(device)
    return row


def release(device: torch.device) -> None:
    """Free the finished run's memory and compiled graphs before the next one."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def moe_block_anchor(spec: Spec, device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One MoE layer of ``spec``'s shape, fwd + bwd in bf16: ours vs transformers' Mixtral block, same weights."""
    import moe_layer

    shape = moe_layer.Shape(spec.experts, spec.top_k, spec.dim, spec.expert_hidden, spec.batch, spec.seq)
    modules = moe_layer.build(shape, torch.bfloat16, device)
    x = torch.randn(shape.batch, shape.seq, shape.hidden, device=device, dtype=torch.bfloat16)
    error = moe_layer.check_outputs(modules, x, torch.bfloat16)
    grad = torch.randn_like(x)
    flops_per_token = 6 * 3 * spec.dim * spec.expert_hidden * spec.top_k  # fwd + bwd of k SwiGLU experts
    peak = peak_tflops(device, "bf16")
    rows = []
    for name in ("ours[auto]", "hf[grouped_mm]", "hf[eager]", "dense"):
        step = moe_layer.step_fn(modules[name], x, grad)
        seconds, _ = time_steps(step, device, args.warmup, args.steps)
        tokens_per_s = shape.tokens / seconds
        rows.append(
            {
                "variant": name,
                "step_ms": seconds * 1e3,
                "tokens_per_s": tokens_per_s,
                "tflops_per_s": flops_per_token * tokens_per_s / 1e12,
                "mfu": mfu(flops_per_token, tokens_per_s, peak),
                "outputs_rel_l2_vs_ours": error,
            }
        )
    del modules
    release(device)
    return rows


def plan(specs: dict[str, Spec], device: torch.device) -> list[tuple[str, Spec, Callable, dict[str, Any]]]:
    """Every run, most telling first (a run that would pass the time budget is skipped and reported so)."""
    runs: list[tuple[str, Spec, Callable, dict[str, Any]]] = []
    settings = [(False, True), (False, False), (True, True), (True, False)]  # (checkpointing, compile)
    for checkpointing, compiled in settings:
        for model in ("dense", "moe"):
            runs.append(
                (
                    model,
                    specs[model],
                    lambda s, c=checkpointing, k=compiled: ours_step(s, device, c, k),
                    {"activation_checkpointing": checkpointing, "compile": compiled},
                )
            )
        if not checkpointing:
            runs.append(
                (
                    "reference",
                    specs["dense"],
                    lambda s, k=compiled: reference_step(s, device, k),
                    {"activation_checkpointing": False, "compile": compiled},
                )
            )
    return runs


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _fmt(v: Any, pattern: str) -> str:
    return "–" if v is None else format(v, pattern)


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# GPU throughput and MFU (bf16)",
        "",
        f"Device: {result['device']}; torch {result['torch']}; bf16 dense peak "
        f"{_fmt(result['peak_tflops'], 'g')} TFLOP/s; {result['warmup']} warm-up + {result['steps']} timed steps"
        + (" (quick mode: tiny shapes, not a measurement)" if result["quick"] else "")
        + ". Written by benchmarks/gpu_throughput.py.",
        "",
        "| run | act. ckpt | compile | batch x seq | params active / total | step ms | tokens/s | model TFLOP/s | MFU |"
        " peak GB | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped")
            lines.append(
                f"| {r['run']} | {r['activation_checkpointing']} | {r['compile']} | {why} |" + " |" * 7
            )
            continue
        goal = GOALS.get(r["run"])
        met = "" if goal is None or r["mfu"] is None else ("met" if r["mfu"] >= goal else f"< {goal:.0%}")
        lines.append(
            f"| {r['run']} | {r['activation_checkpointing']} | {r['compile']} | {r['batch']} x {r['seq']} | "
            f"{_count(r['params_active'])} / {_count(r['params_total'])} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['model_tflops_per_s']:.1f} | {_fmt(r['mfu'], '.1%')} | "
            f"{_fmt(r['peak_memory_gb'], '.1f')} | {met} |"
        )
    lines += [
        "",
        "MoE block, forward + backward, same weights (transformers' MixtralSparseMoeBlock):",
        "",
        "| variant | step ms | tokens/s | expert TFLOP/s | MFU |",
        "|---|---|---|---|---|",
    ]
    for r in result["moe_block"]:
        lines.append(
            f"| {r['variant']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.1f} | "
            f"{_fmt(r['mfu'], '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes on any device (a check, not a figure)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 10; quick 2)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no run after this many seconds (default 330; quick: none)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/gpu)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    budget_s = args.budget_s if args.budget_s is not None else (math.inf if args.quick else 330.0)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("no CUDA device visible: the full shapes need a GPU; use --quick for a check on CPU")
    out = args.out or (REPO / ("runs/gpu_quick/gpu" if args.quick else "benchmarks/results/gpu"))
    specs = QUICK if args.quick else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "peak_tflops": peak_tflops(device, "bf16"),
        "quick": args.quick,
        "warmup": args.warmup,
        "steps": args.steps,
        "specs": {k: asdict(v) for k, v in specs.items()},
        "runs": [],
        "moe_block": [],
    }
    print(f"device {result['device']}, bf16 peak {result['peak_tflops']} TFLOP/s", flush=True)
    result["moe_block"] = moe_block_anchor(specs["moe"], device, args)
    for name, spec, make_step, settings in plan(specs, device):
        if time.perf_counter() - started > budget_s:
            result["runs"].append({"run": name, **settings, "skipped": f"time budget {budget_s:g} s spent"})
        else:
            row = measure(name, spec, make_step, device, args, settings)
            print(f"  {json.dumps({k: v for k, v in row.items() if not k.startswith('params')})}", flush=True)
            result["runs"].append(row)
        result["elapsed_s"] = time.perf_counter() - started
        write(result, out)  # after every run: a run killed by an outer time limit keeps the rows before it
    print(to_markdown(result))
    print(f"wrote {out.name}.json and .md in {result['elapsed_s']:.0f} s")
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
