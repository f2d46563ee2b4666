"""Per-rank memory of a training job, by kind, in bytes: the estimate as data (:class:`MemoryPlan`).

Kinds (one rank; every rank of a layout holds the same amounts here, ep and tp ranks included):

- **parameters**: the local shards the parallel code leaves on this rank (fp32: ``train.dtype=bf16`` is autocast,
  so the weights are the fp32 master copy; FSDP2's ``parallel.param_dtype`` only changes what it gathers; with
  ``parallel.cpu_offload`` parameters, gradients and optimizer state are host memory and count 0 here);
- **gradients**: the local shards of the trainable parameters, in their dtype;
- **optimizer state**: AdamW's two moments per trainable element (fp32);
- **activations**: what autograd keeps for one micro-batch's backward, per layer from the tensors our blocks save
  (read with ``torch.autograd.graph.saved_tensors_hooks`` on the real blocks), plus the LM head's logits buffers at
  the start of the backward (logits, log-softmax output and their two gradients, ``[micro_batch, seq, vocab]`` fp32)
  or, with activation checkpointing, each block's input plus one block recomputed; see :func:`activation_bytes`;
- **communication buffers**: FSDP2's all-gathered parameters (``parallel.param_dtype``) at the backward's peak: the
  head unit (final norm and LM head, gathered from its forward to its backward), the root (with tied embeddings the
  shared embedding/head: the whole step) and two blocks (the current one and the prefetched one); the embedding
  unit is gathered only for its own forward and backward and is not counted. Plus the largest unit's unsharded
  gradients (reduce-scatter input, ``parallel.reduce_dtype``); DDP's gradient buckets; the all-to-all send and
  receive buffers of one MoE layer under expert parallelism; the sequence all-gather under tensor parallelism;
- **allocator** (CPU only): glibc malloc keeps freed small blocks mapped, so the peak RSS exceeds the live tensors:
  counted as half of the step's activations and gradients (measured 0.3-0.9), and under FSDP2 one copy of the
  gathered parameters and unsharded gradients below glibc's 32 MiB mmap ceiling (:func:`_fsdp_heap_churn`). On CUDA
  the caching allocator's fragmentation is not counted: keep a few GiB of headroom;
- **runtime**: a fixed overhead stated as its own line (CPU: interpreter, torch, the framework and the data loader,
  measured; GPU: CUDA context and kernels, a typical value).

With one micro-batch per step the gradients of a step are allocated while its activations are freed (the
optimizer sets them to ``None`` after each step), so the peak holds the larger of the two rather than their sum: the
table shows that overlap as its own negative line. With gradient accumulation every micro-batch after the first runs
its backward with the gradients already there, and the sum stands.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from framework.config import JobConfig
from framework.parallel.mesh import ParallelLayout
from framework.plan.build import MetaJob

FP32 = 4
BF16 = 2
INT64 = 8
ADAMW_STATES = 2

CPU_RUNTIME_BYTES = 350 * 2**20
"""Peak RSS of a one-rank training run of a 0.26M-parameter model (the interpreter, torch, the framework, the
embedded corpus and tokenizer): measured 350 MiB (benchmarks/plan_accuracy.py reruns it)."""
CPU_ALLOCATOR_SHARE = 0.5
"""glibc malloc keeps freed blocks under its mmap threshold (which grows to 32 MiB) mapped for reuse, and their
fragments raise the peak RSS above the live tensors: measured 0.3-0.9 of a step's activations and gradients at the
calibration sizes (benchmarks/plan_accuracy.py), counted as half."""
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
"""The ceiling of glibc malloc's dynamic mmap threshold on 64-bit Linux: once freeing a mapped block has raised the
threshold, blocks up to this size come from the heap, and freed ones stay mapped there for reuse."""
CUDA_RUNTIME_BYTES = 2**30
"""CUDA context, cuBLAS workspace and loaded kernels on one GPU (typically 0.5-1 GiB with torch 2.x): 1 GiB."""


@dataclass(frozen=True)
class MemoryLine:
    """One kind of memory: ``bytes`` on this rank and how it was counted."""

    kind: str
    bytes: int
    detail: str


@dataclass
class MemoryPlan:
    """Per-rank memory of one job, by kind, with the verdict against a capacity."""

    world: int
    layout: str
    device: str
    lines: list[MemoryLine]
    capacity_bytes: int | None
    notes: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(line.bytes for line in self.lines)

    def bytes_of(self, kind: str) -> int:
        return sum(line.bytes for line in self.lines if line.kind == kind)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.total_bytes <= self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every line, the total and the verdict."""
        return {
            "world": self.world,
            "layout": self.layout,
            "device": self.device,
            "model": self.model,
            "lines": [asdict(line) for line in self.lines],
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "fits": self.fits,
            "headroom_bytes": None if self.capacity_bytes is None else self.capacity_bytes - self.total_bytes,
            "notes": self.notes,
        }

    def format_table(self) -> str:
        """The per-rank table, its total and the verdict, for a terminal."""
        width = max(len(line.kind) for line in self.lines)
        head = f"per-rank memory on {self.world} rank(s), {self.layout} ({self.device}); every rank holds the same"
        rows = [head, "-" * len(head)]
        for line in self.lines:
            rows.append(f"{line.kind:<{width}}  {format_bytes(line.bytes):>10}  {line.detail}")
        rows.append(f"{'total':<{width}}  {format_bytes(self.total_bytes):>10}")
        if self.capacity_bytes is not None:
            room = self.capacity_bytes - self.total_bytes
            verdict = "yes" if room >= 0 else "no"
            rows.append(
                f"fits in {format_bytes(self.capacity_bytes)}: {verdict} "
                f"({'headroom' if room >= 0 else 'short by'} {format_bytes(abs(room))})"
            )
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB / MiB with two or one decimals."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


_SIZE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``80GB`` / ``80GiB`` / ``80G`` / ``512MiB`` -> bytes (binary units: GPU memory is sold in GiB as "GB")."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"memory size {text!r}: expected a number and a unit, e.g. 80GB or 512MiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


# --------------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch on one rank."""

    saved: int
    """Kept for the backward across all blocks (checkpointing: their inputs only)."""
    peak_extra: int
    """On top of ``saved`` at the backward's peak: the LM head's buffers, or one block recomputed and its
    gradients (the larger)."""

    @property
    def total(self) -> int:
        return self.saved + self.peak_extra


@dataclass(frozen=True)
class _Sizes:
    """Per-token element counts of the tensors a block saves (read off the real blocks, see the module docstring)."""

    tokens: int
    seq_split: int
    tp: int
    compute_bytes: int


def _attention_elements(cfg: JobConfig, tp: int) -> tuple[float, float]:
    """Elements per token the attention keeps between its input norm and its output projection (the norm's output
    and everything after it), and the largest pair of them alive at once in its backward."""
    m = cfg.model
    if m.attention == "mla":
        heads = m.n_heads / tp
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        latent = 2 * m.kv_lora_rank + m.qk_rope_head_dim + (2 * m.q_lora_rank if m.q_lora_rank else 0)
        # normed input, latents, kv up-projection, q and k with their rope parts, attention output, log-sum-exp
        kept = m.dim + latent + heads * (m.qk_nope_head_dim + v) + 2 * heads * qk + heads * v + heads
        return kept, m.dim + heads * (qk + v)
    q = m.n_heads * m.resolved_head_dim / tp
    kv = m.n_kv_heads * m.resolved_head_dim / tp
    # normed input, rotated q and k, v, attention output (the o_proj input), log-sum-exp
    kept = m.dim + 2 * q + 2 * kv + m.n_heads / tp
    if m.qk_norm:  # q and k before and after their head norms, and the per-head 1/rms
        kept += 2 * q + 2 * kv + (m.n_heads + m.n_kv_heads) / tp
    return kept, m.dim + q + 2 * kv


def _moe_elements(cfg: JobConfig, layout: ParallelLayout, shape: dict[str, int]) -> tuple[float, float]:
    """Per micro-batch token: what an MoE feed-forward keeps (routed rows balanced over the experts) and its
    largest backward pair. Under tensor parallelism each rank routes its sequence slice; with expert tensor
    parallelism the group's rows are gathered and every rank computes its slice of each expert's hidden units."""
    d, k, e = cfg.model.dim, shape["top_k"], shape["num_experts"]
    tp, etp = layout.tp, layout.etp if layout.tp > 1 else 1
    own = 1 / tp  # share of the micro-batch's tokens this rank routes
    rows = k * own * etp
    hidden = shape["hidden"] / etp
    # router: scores (fp32), top-k ids and weights, dispatch indices (int64 counted as two fp32 slots)
    router = own * (e + 1 + 2 * k + 3 * k * (INT64 // FP32))
    # dispatched input, gate|up output, swiglu output, expert output, weighted output
    routed = rows * (3 * d + 3 * hidden)
    shared = own * 3 * shape["shared_hidden"]
    return own * d + router + routed + shared, rows * (2 * hidden + d)


def _dense_elements(cfg: JobConfig, tp: int) -> tuple[float, float]:
    hidden = cfg.model.ffn_hidden / tp
    return cfg.model.dim + 3 * hidden, 2 * hidden + cfg.model.dim  # normed input, gate, up, swiglu output


def _compute_bytes(cfg: JobConfig) -> int:
    """Bytes of a matmul output: 2 under bf16 autocast or FSDP2's bf16 ``param_dtype``, else 4."""
    bf16 = cfg.train.dtype == "bf16" or (cfg.parallel.data == "fsdp" and cfg.parallel.param_dtype == "bf16")
    return BF16 if bf16 else FP32


def activation_bytes(job: MetaJob) -> ActivationEstimate:
    """Activation bytes of one micro-batch on one rank of ``job``.

    Per block (elements per token of the micro-batch, ``D`` model dim, ``Q``/``KV`` query/key-value widths, ``F``
    dense hidden, ``k`` experts per token, ``I`` expert hidden): the block input and the residual after attention
    (``2D``, split over tp with sequence parallelism), the attention's ``D + 2Q + 2KV + heads`` (+ ``2Q + 2KV`` with
    q/k norms; MLA: its latents and up-projections), and the feed-forward's ``D + 3F`` (dense) or
    ``D + E + k·(3D + 3I)`` (MoE, plus ``3·shared`` for shared experts). Head: the final norm's input and output
    (``2D``) and ``4·V`` fp32 (logits, log-softmax, both gradients). bf16 autocast: matmul outputs at 2 bytes, the
    residual stream and norms at 4 (not calibrated).
    """
    cfg, layout = job.config, job.layout
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    tp = layout.tp
    split = tp if layout.sequence_parallel else 1
    compute = _compute_bytes(cfg)
    attention, attention_pair = _attention_elements(cfg, tp)
    moe_index = 0
    per_block: list[tuple[float, float]] = []  # (kept elements, largest backward pair) per token
    from framework.models.transformer import is_moe_layer

    for layer_id in range(cfg.model.n_layers):
        if is_moe_layer(layer_id, cfg.moe) and moe_index < len(job.moe_shapes):
            ffn, ffn_pair = _moe_elements(cfg, layout, job.moe_shapes[moe_index])
            moe_index += 1
        else:
            ffn, ffn_pair = _dense_elements(cfg, tp)
        residual = 2 * cfg.model.dim / split  # the block input and the residual after attention (fp32)
        kept = residual * FP32 + (attention + ffn) * compute
        per_block.append((kept, max(attention_pair, ffn_pair) * compute))
    block_input = cfg.model.dim / split * FP32
    head = 2 * cfg.model.dim * FP32 + 4 * cfg.model.vocab_size / tp * FP32
    if cfg.train.activation_checkpointing:
        saved = len(per_block) * block_input
        recompute = max(kept + pair for kept, pair in per_block)
        extra = max(head, recompute)
    else:
        saved = sum(kept for kept, _ in per_block)
        extra = max(head, max(pair for _, pair in per_block))
    return ActivationEstimate(int(saved * tokens), int(extra * tokens))


# --------------------------------------------------------------------------------------------------- the plan


def _gathered_units(job: MetaJob, trainable_only: bool, element_size: int) -> dict[str, int]:
    """Bytes each FSDP2 unit gathers (``element_size`` per element: ``parallel.param_dtype`` for the parameter
    all-gather, ``reduce_dtype`` for the gradient reduce-scatter), by unit name (see
    :func:`framework.plan.build._fsdp_unit`)."""
    units: dict[str, int] = {}
    for s in job.shards:
        if trainable_only and not s.trainable:
            continue
        units[s.unit] = units.get(s.unit, 0) + s.gathered_numel * element_size
    return units


def _largest_block(units: dict[str, int]) -> int:
    return max((n for unit, n in units.items() if unit.startswith("layers.")), default=0)


def _dtype_bytes(name: str) -> int:
    return BF16 if name == "bf16" else FP32


def _communication(job: MetaJob, compute: int) -> tuple[int, list[str]]:
    cfg, layout = job.config, job.layout
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    total, parts = 0, []
    if layout.dp > 1 and cfg.parallel.data == "fsdp":
        units = _gathered_units(job, False, _dtype_bytes(cfg.parallel.param_dtype))
        # At the backward's peak: the head (norm + LM head) and the root stay gathered, with two blocks (the current
        # one and the prefetched one); the embedding is gathered only for its own forward and backward.
        kept = units.get("head", 0) + units.get("root", 0)
        block = _largest_block(units)
        scatter = max(_gathered_units(job, True, _dtype_bytes(cfg.parallel.reduce_dtype)).values(), default=0)
        total += kept + 2 * block + scatter
        parts.append(
            f"FSDP all-gather: head and root {format_bytes(kept)} + 2 blocks {format_bytes(2 * block)}; "
            f"reduce-scatter {format_bytes(scatter)}"
        )
    elif layout.dp > 1:
        buckets = sum(s.local_numel * s.element_size for s in job.shards if s.trainable)
        total += buckets
        parts.append(f"DDP gradient buckets {format_bytes(buckets)}")
    if layout.ep > 1 and job.moe_shapes:
        rows = max(shape["top_k"] for shape in job.moe_shapes) * tokens / layout.tp
        a2a = int(2 * rows * cfg.model.dim * compute)
        total += a2a
        parts.append(f"all-to-all send+receive {format_bytes(a2a)}")
    if layout.tp > 1:
        gathered = int(2 * tokens * cfg.model.dim * compute)
        total += gathered
        parts.append(f"tp sequence all-gather {format_bytes(gathered)}")
    return total, parts


def _fsdp_heap_churn(job: MetaJob) -> int:
    """CPU ranks under FSDP2: what glibc keeps of the step's all-gathered parameters and unsharded gradients.

    Each step FSDP2 allocates every parameter's gathered copy (forward, and again in the backward) and its unsharded
    gradient, and frees them block by block. glibc serves every tensor below its mmap ceiling
    (:data:`GLIBC_MMAP_THRESHOLD_MAX`) from its heap and keeps the freed blocks there; measured under torchrun at three
    sizes (benchmarks/plan_accuracy.py), the peak RSS exceeded the live tensors by about one copy of each of those
    tensors (gathered parameters in ``param_dtype``, gradients in ``reduce_dtype``), while tensors above the ceiling
    (mapped, unmapped when freed) added nothing. Fixing the threshold (``MALLOC_MMAP_THRESHOLD_``) removes the term."""
    cfg, layout = job.config, job.layout
    if layout.dp <= 1 or cfg.parallel.data != "fsdp" or cfg.parallel.cpu_offload:
        return 0
    param_size, grad_size = _dtype_bytes(cfg.parallel.param_dtype), _dtype_bytes(cfg.parallel.reduce_dtype)
    total = 0
    for s in job.shards:
        for size, counted in ((param_size, True), (grad_size, s.trainable)):
            tensor = s.gathered_numel * size
            if counted and tensor < GLIBC_MMAP_THRESHOLD_MAX:
                total += tensor
    return total


def plan_memory(job: MetaJob, device: str, capacity_bytes: int | None = None) -> MemoryPlan:
    """The per-rank table of ``job`` on ``device`` (``cpu`` or ``cuda``) against ``capacity_bytes``."""
    cfg, layout = job.config, job.layout
    compute = _compute_bytes(cfg)
    param_bytes = sum(s.local_numel * s.element_size for s in job.shards)
    local_numel = sum(s.local_numel for s in job.shards)
    trainable = sum(s.local_numel for s in job.shards if s.trainable)
    grad_bytes = sum(s.local_numel * s.element_size for s in job.shards if s.trainable)
    optim_bytes = ADAMW_STATES * trainable * FP32
    acts = activation_bytes(job)
    comm, comm_parts = _communication(job, compute)
    runtime = CUDA_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    checkpointing = "with" if cfg.train.activation_checkpointing else "without"
    offload = cfg.parallel.cpu_offload and cfg.parallel.data == "fsdp" and layout.dp > 1
    where = " - on the host (parallel.cpu_offload)" if offload else ""
    lines = [
        MemoryLine(
            "parameters",
            0 if offload else param_bytes,
            f"{local_numel / 1e6:,.1f}M local elements (fp32){where}",
        ),
        MemoryLine(
            "gradients",
            0 if offload else grad_bytes,
            f"{trainable / 1e6:,.1f}M trainable local elements{where}",
        ),
        MemoryLine(
            "optimizer state", 0 if offload else optim_bytes, f"AdamW exp_avg + exp_avg_sq, fp32{where}"
        ),
        MemoryLine(
            "activations",
            acts.total,
            f"micro-batch {cfg.train.micro_batch_size}x{cfg.data.seq_len}, {checkpointing} activation "
            f"checkpointing: {format_bytes(acts.saved)} kept + {format_bytes(acts.peak_extra)} at the backward peak",
        ),
    ]
    if job.accumulation == 1:
        lines.append(
            MemoryLine(
                "grad/activation overlap",
                -min(0 if offload else grad_bytes, acts.total),
                "one micro-batch per step: gradients fill as activations free (peak = the larger)",
            )
        )
    if device == "cpu":
        share = int(CPU_ALLOCATOR_SHARE * (acts.total + (0 if offload else grad_bytes)))
        churn = _fsdp_heap_churn(job)
        detail = f"glibc arenas keep freed blocks: {CPU_ALLOCATOR_SHARE:g} x (activations + gradients)"
        if churn:
            detail += (
                f" + FSDP2's gathered parameters and unsharded gradients under glibc's 32 MiB mmap ceiling, "
                f"one copy each ({format_bytes(churn)})"
            )
        lines.append(MemoryLine("allocator", share + churn, detail))
    lines += [
        MemoryLine("communication buffers", comm, "; ".join(comm_parts) or "none (one rank)"),
        MemoryLine(
            "runtime",
            runtime,
            "CUDA context and kernels (typical)"
            if device == "cuda"
            else "interpreter, torch, framework, data (measured)",
        ),
    ]
    notes = list(job.notes)
    if offload:
        host = param_bytes + grad_bytes + optim_bytes
        notes.append(f"host memory per rank for the offloaded shards: {format_bytes(host)}")
    if job.moe_shapes:
        notes.append("MoE rows counted with balanced routing (dropless: a hot expert's rank holds more)")
    if cfg.train.compile:
        notes.append("train.compile is not modelled (compiled blocks usually keep fewer activations)")
    total_params = job.total_params
    model = {
        "total_params": total_params,
        "trainable_local": trainable,
        "accumulation": job.accumulation,
        "tokens_per_micro_batch": cfg.train.micro_batch_size * cfg.data.seq_len,
    }
    return MemoryPlan(layout.world, layout.describe(), device, lines, capacity_bytes, notes, model)
