"""MoE layer benchmark: our MoELayer vs transformers' MixtralSparseMoeBlock vs a dense SwiGLU of equal active FLOPs.

Forward + backward of one layer, in fp32 and bf16, with the same weights in every MoE variant (outputs are checked to
match before anything is timed). Prints time, tokens/s, peak memory and ratios.

    python benchmarks/moe_layer.py            # E=8, k=2, H=512, I=1024, 4096 tokens
    python benchmarks/moe_layer.py --quick    # a small shape, seconds

Timing: the variants run interleaved, ``--repeats`` rounds after one warm-up each; we report the minimum (the least
disturbed run; shared CI hosts are noisy) and the median. Memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
the peak resident-set growth over one step, sampled every millisecond by a thread, with glibc's mmap threshold fixed at
64 KiB in a separate child process (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS; a
sampled number can miss a peak shorter than a millisecond.

bf16: weights and inputs in bf16 (routers still run in fp32 on our side, in bf16 inside transformers' router); the
outputs must agree to a relative L2 error below 3e-2 (bf16 keeps 8 mantissa bits and a near-tie in the bf16 router can
send a token to a different expert). On a CPU without native bf16 matmul (no AVX512-BF16/AMX) bf16 is hundreds of times
slower than fp32, so ``--bf16 auto`` skips it there at the full shape and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.config.sections import MoEConfig  # noqa: E402
from framework.models.mlp import FeedForward  # noqa: E402
from framework.models.moe.layer import MoELayer  # noqa: E402


@dataclass
class Shape:
    experts: int
    top_k: int
    hidden: int
    inter: int
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._max = self.base

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self._proc.memory_info().rss)
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak = self._max - self.base


def build(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    modules: dict[str, torch.nn.Module] = {}
    ours_cfg = dict(num_experts=shape.experts, top_k=shape.top_k, expert_hidden=shape.inter)
    reference = None
    for impl in ("auto", "loop", "grouped_mm", "bmm"):
        layer = MoELayer(shape.hidden, MoEConfig(**ours_cfg, experts_impl=impl))  # type: ignore[arg-type]
        if reference is None:
            layer.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
            # A router with confident scores (logit std ~ 0.1·sqrt(H)), as after some training; near-uniform scores
            # would make bf16 routers flip many near-ties and the comparison meaningless.
            torch.nn.init.normal_(
                layer.router.gate.weight, std=0.1, generator=torch.Generator().manual_seed(1)
            )
            reference = layer
        else:
            layer.load_state_dict(reference.state_dict())
        modules[f"ours[{impl}]"] = layer
    for impl in ("grouped_mm", "eager"):
        cfg = MixtralConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.inter,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            experts_implementation=impl,
        )
        block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            block.gate.weight.copy_(reference.router.gate.weight)
            block.experts.gate_up_proj.copy_(
                reference.experts.gate_up_proj.view_as(block.experts.gate_up_proj)
            )
            block.experts.down_proj.copy_(reference.experts.down_proj)
        modules[f"hf[{impl}]"] = block
    dense = FeedForward(shape.hidden, shape.top_k * shape.inter)  # same active FLOPs per token as k experts
    dense.init_weights(0.02, 0.02, torch.Generator().manual_seed(0))
    modules["dense"] = dense
    for m in modules.values():
        m.to(device=device, dtype=dtype).train()
    return modules


def check_outputs(modules: dict[str, torch.nn.Module], x: torch.Tensor, dtype: torch.dtype) -> float:
    """All MoE variants agree with ours[auto] (fp32 within 1e-5; bf16 relative L2 < 3e-2). Returns the worst error."""
    with torch.no_grad():
        ref = modules["ours[auto]"](x).float()
        worst = 0.0
        for name, m in modules.items():
            if name == "dense":
                continue
            y = m(x).float()
            if dtype == torch.float32:
                err = (y - ref).abs().max().item()
                assert err <= 1e-5 + 1e-5 * ref.abs().max().item(), f"{name} differs by {err}"
            else:
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 3e-2, f"{name} relative L2 error {err}"
            worst = max(worst, err)
    for m in modules.values():
        if isinstance(m, MoELayer):
            m.pop_aux_losses(), m.consume_expert_counts(), m.routing_stats()
    return worst


def step_fn(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x_in = x.detach().requires_grad_()
        y = module(x_in)
        loss = (y * grad).sum()
        if isinstance(module, MoELayer):
            aux = module.pop_aux_losses()  # what the trainer does
            loss = loss + sum(aux.values())
            module.consume_expert_counts()
        loss.backward()
        module.zero_grad(set_to_none=True)

    return step


def run(
    shape: Shape, dtype: torch.dtype, device: torch.device, repeats: int
) -> list[tuple[str, float, float, int]]:
    modules = build(shape, dtype, device)
    x = torch.randn(shape.batch, shape.seq, shape.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    err = check_outputs(modules, x, dtype)
    print(f"  outputs match ({'max abs' if dtype == torch.float32 else 'rel L2'} error {err:.2e})")
    steps = {name: step_fn(m, x, grad) for name, m in modules.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up (first-call allocations would pollute the memory numbers)
        step()
    peaks = measure_memory(shape, dtype, device) if device.type == "cuda" else memory_in_child(dtype)
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return [(n, min(t), statistics.median(t), peaks[n]) for n, t in times.items()]


def measure_memory(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """Peak memory growth (bytes) of one warmed-up fwd+bwd step per variant."""
    modules = build(shape, dtype, device)
    x = torch.randn(shape.batch, shape.seq, shape.hidden, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    steps = {name: step_fn(m, x, grad) for name, m in modules.items()}
    for step in steps.values():
        step()
    peaks = {}
    for name, step in steps.items():
        with PeakMemory(device) as mem:
            step()
        peaks[name] = mem.peak
    return peaks


def memory_in_child(dtype: torch.dtype) -> dict[str, int]:
    """CPU memory is measured in a child process whose glibc returns every freed tensor > 64 KiB to the OS
    (``MALLOC_MMAP_THRESHOLD_``), so RSS tracks live memory; the timing process keeps the default allocator, whose
    page reuse the fixed threshold would slow down."""
    args = [a for a in sys.argv[1:] if a != "--memory-only"]
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *args,
        "--memory-only",
        "fp32" if dtype == torch.float32 else "bf16",
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("PEAKS "))[6:])


def print_table(rows: list[tuple[str, float, float, int]], tokens: int, title: str) -> None:
    best = {n: t for n, t, _, _ in rows}
    hf_best = min(best["hf[grouped_mm]"], best["hf[eager]"])
    print(f"\n{title}")
    header = (
        f"| {'variant':<16} | {'min ms':>8} | {'median ms':>9} | {'tokens/s':>9} | {'peak MB':>8} |"
        f" {'vs best HF':>10} | {'vs dense':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, t_min, t_med, peak in rows:
        print(
            f"| {name:<16} | {t_min * 1e3:8.1f} | {t_med * 1e3:9.1f} | {tokens / t_min:9.0f} | {peak / 2**20:8.1f} |"
            f" {t_min / hf_best:9.2f}x | {t_min / best['dense']:7.2f}x |"
        )
    ours = best["ours[auto]"]
    print(
        f"targets: ours[auto] faster than the faster HF path: {'yes' if ours < hf_best else 'NO'} "
        f"({ours / hf_best:.2f}x); within 1.25x of dense: {'yes' if ours <= 1.25 * best['dense'] else 'NO'} "
        f"({ours / best['dense']:.2f}x)"
    )


def bf16_is_native(device: torch.device) -> bool:
    """Whether a bf16 matmul is at least a quarter as fast as fp32 here (false on CPUs without bf16 units)."""
    if device.type == "cuda":
        return True
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, dtype=dt)
        a @ a
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        rates[dt] = time.perf_counter() - t0
    return rates[torch.bfloat16] < 4 * rates[torch.float32]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shape (E=4, k=2, H=128, I=256, 512 tokens)"
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed rounds per variant (default 5, quick 3)"
    )
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-only", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = Shape(4, 2, 128, 256, 2, 256) if args.quick else Shape(8, 2, 512, 1024, 4, 1024)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.memory_only:
        dtype = torch.float32 if args.memory_only == "fp32" else torch.bfloat16
        print("PEAKS " + json.dumps(measure_memory(shape, dtype, device)))
        return
    print(
        f"MoE layer fwd+bwd on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}: "
        f"E={shape.experts} k={shape.top_k} H={shape.hidden} I={shape.inter} tokens={shape.tokens}; "
        f"dense SwiGLU hidden={shape.top_k * shape.inter}; {repeats} interleaved rounds"
    )
    dtypes = [torch.float32]
    if args.bf16 == "on" or (args.bf16 == "auto" and (args.quick or bf16_is_native(device))):
        dtypes.append(torch.bfloat16)
    elif args.bf16 == "auto":
        print("bf16 skipped: this CPU has no native bf16 matmul (use --bf16 on to force, or --quick)")
    for dtype in dtypes:
        label = "fp32" if dtype == torch.float32 else "bf16"
        print(f"\n[{label}]")
        rows = run(shape, dtype, device, repeats)
        print_table(rows, shape.tokens, f"{label}, {shape.tokens} tokens")


if __name__ == "__main__":
    main()
