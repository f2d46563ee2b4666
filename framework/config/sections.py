"""The core config sections. Each field documents itself; ``docs/config.md`` is generated from these classes.

Plugins add their own top-level sections through the ``expertrain_config_sections`` hook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from framework.config.errors import ConfigError
from framework.config.schema import option


@dataclass
class ModelConfig:
    """Decoder-only transformer shape."""

    vocab_size: int = option(8192, doc="Vocabulary size; must equal the tokenizer's.", min=2)
    dim: int = option(256, doc="Hidden size.", min=1)
    n_layers: int = option(4, doc="Number of transformer blocks.", min=1)
    n_heads: int = option(8, doc="Attention (query) heads.", min=1)
    n_kv_heads: int = option(4, doc="Key/value heads (grouped-query attention); must divide n_heads.", min=1)
    head_dim: int = option(0, doc="Per-head size; 0 means dim // n_heads.", min=0)
    ffn_hidden: int = option(704, doc="Intermediate size of the dense SwiGLU MLP.", min=1)
    max_seq_len: int = option(256, doc="Longest sequence the RoPE tables cover.", min=1)
    rope_theta: float = option(10000.0, doc="RoPE base frequency.", min=0.0, min_exclusive=True)
    norm_eps: float = option(1e-5, doc="RMSNorm epsilon.", min=0.0, min_exclusive=True)
    tie_embeddings: bool = option(False, doc="Share the token embedding with the LM head.")
    init_std: float = option(
        0.02, doc="Std of the normal weight init (output projections scaled by 1/sqrt(2L)).", min=0.0
    )
    attention: str = option(
        "gqa",
        doc="Attention component name in the registry: gqa (grouped-query) or mla (DeepSeek multi-head latent "
        "attention); plugins may add variants.",
    )
    qkv_bias: bool = option(
        False, doc="gqa: learned biases on the q/k/v projections (Qwen2; Llama's attention_bias sets it)."
    )
    o_bias: bool = option(
        False, doc="gqa: a learned bias on the output projection (Llama's attention_bias sets it)."
    )
    qk_norm: bool = option(
        False, doc="gqa: RMSNorm over head_dim on every query and key head before RoPE (Qwen3)."
    )
    q_lora_rank: int = option(
        0,
        doc="mla: rank of the low-rank query projection (q_a_proj -> norm -> q_b_proj); 0 = one q_proj.",
        min=0,
    )
    kv_lora_rank: int = option(0, doc="mla: rank of the compressed key/value latent.", min=0)
    qk_nope_head_dim: int = option(0, doc="mla: per-head query/key size without RoPE.", min=0)
    qk_rope_head_dim: int = option(
        0, doc="mla: per-head query/key size with RoPE (the key part is shared by all heads).", min=0
    )
    v_head_dim: int = option(0, doc="mla: per-head value size.", min=0)
    init_from: str = option(
        "",
        doc="Start from the model weights of an expertrain run (its latest checkpoint) or step_XXXXXXXX checkpoint, "
        "or of a Hugging Face folder (hf:<folder>); the model and moe sections (and the plugins the model needs) "
        "come from it, and values the job sets must agree. Optimizer, step and data start fresh. "
        "Ignored when the run resumes from its own checkpoint. Empty = random init.",
    )

    def validate(self, prefix: str) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{prefix}.n_kv_heads", self.n_kv_heads, f"expected a divisor of n_heads={self.n_heads}"
            )
        if self.attention == "mla":
            self._validate_mla(prefix)
            return
        if self.head_dim == 0 and self.dim % self.n_heads:
            raise ConfigError(
                f"{prefix}.dim", self.dim, f"expected a multiple of n_heads={self.n_heads} (or set head_dim)"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(
                f"{prefix}.head_dim",
                self.resolved_head_dim,
                "expected an even head size (RoPE rotates pairs)",
            )

    def _validate_mla(self, prefix: str) -> None:
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{prefix}.{name}", getattr(self, name), "expected >= 1 with attention: mla"
                )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"{prefix}.qk_rope_head_dim",
                self.qk_rope_head_dim,
                "expected an even size (RoPE rotates pairs)",
            )
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(
                f"{prefix}.n_kv_heads",
                self.n_kv_heads,
                f"expected n_heads={self.n_heads} with attention: mla (every head has its own key and value)",
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_head_dim(self) -> int:
        """Size of the rotated part of a query/key head: ``qk_rope_head_dim`` for mla, else the head size."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key size per head (the attention FLOPs): ``qk_nope_head_dim + qk_rope_head_dim`` for mla."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.resolved_head_dim


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers: placement, routing, balancing, capacity."""

    num_experts: int = option(8, doc="Routed experts per MoE layer; 0 makes every layer dense.", min=0)
    top_k: int = option(2, doc="Experts each token is routed to.", min=1)
    expert_hidden: int = option(352, doc="Intermediate size of one expert's SwiGLU.", min=1)
    shared_experts: int = option(
        0,
        doc="Shared experts every token goes through beside its routed ones (DeepSeekMoE, Qwen2-MoE), fused into one "
        "SwiGLU MLP; 0 = none.",
        min=0,
    )
    shared_expert_hidden: int = option(
        0,
        doc="Hidden size of the fused shared-expert MLP; 0 = shared_experts * expert_hidden (Qwen2-MoE's "
        "shared_expert_intermediate_size sets it).",
        min=0,
    )
    shared_expert_gate: bool = option(
        False, doc="Scale the shared experts' output by a per-token sigmoid gate sigmoid(x*w_g) (Qwen2-MoE)."
    )
    every: int = option(
        1, doc="Every k-th layer (counting from the first after first_k_dense) is MoE.", min=1
    )
    first_k_dense: int = option(0, doc="The first k layers use the dense MLP.", min=0)
    block: str = option("moe", doc="MoE block component name in the registry (plugins may add variants).")
    router: str = option("topk", doc="Router component name in the registry.")
    score_func: Literal["softmax", "sigmoid"] = option(
        "softmax", doc="Router score function (computed in fp32)."
    )
    route_norm: bool = option(
        True, doc="Renormalise the top-k weights to sum to 1 (always done for sigmoid)."
    )
    route_scale: float = option(
        1.0, doc="Routed scaling factor applied to the gate weights.", min=0.0, min_exclusive=True
    )
    n_groups: int = option(1, doc="Expert groups for group-limited routing (1 = off).", min=1)
    topk_groups: int = option(1, doc="Groups kept per token in group-limited routing.", min=1)
    aux_loss_coef: float = option(0.01, doc="Switch/GShard load-balance loss coefficient.", min=0.0)
    seq_aux_loss_coef: float = option(
        0.0, doc="Sequence-wise balance loss coefficient (DeepSeek-V3).", min=0.0
    )
    z_loss_coef: float = option(0.0, doc="Router z-loss coefficient.", min=0.0)
    bias_update_rate: float = option(
        0.0,
        doc="Aux-loss-free bias step gamma (0 = off); b += gamma*sign(mean(c) - c) after each optimizer step.",
        min=0.0,
    )
    capacity_factor: float = option(0.0, doc="Expert capacity factor; 0 = dropless.", min=0.0)
    drop_policy: Literal["probs", "position"] = option(
        "probs", doc="Which tokens an over-capacity expert drops."
    )
    experts_impl: Literal["auto", "grouped_mm", "loop", "bmm"] = option(
        "auto", doc="Expert compute kernel; auto = grouped_mm on CUDA, the fastest measured path on CPU."
    )

    def validate(self, prefix: str) -> None:
        if self.num_experts and self.top_k > self.num_experts:
            raise ConfigError(
                f"{prefix}.top_k", self.top_k, f"expected at most num_experts={self.num_experts}"
            )
        if self.num_experts and self.num_experts % self.n_groups:
            raise ConfigError(
                f"{prefix}.n_groups", self.n_groups, f"expected a divisor of num_experts={self.num_experts}"
            )
        if self.topk_groups > self.n_groups:
            raise ConfigError(
                f"{prefix}.topk_groups", self.topk_groups, f"expected at most n_groups={self.n_groups}"
            )
        for name, value in (
            ("shared_expert_hidden", self.shared_expert_hidden),
            ("shared_expert_gate", self.shared_expert_gate),
        ):
            if value and not self.shared_experts:
                raise ConfigError(
                    f"{prefix}.{name}",
                    value,
                    f"expected {'0' if name.endswith('hidden') else 'false'} without shared experts; set "
                    f"{prefix}.shared_experts >= 1 to add them",
                )

    @property
    def resolved_shared_hidden(self) -> int:
        """Hidden size of the fused shared-expert MLP (0 = no shared experts)."""
        if not self.shared_experts:
            return 0
        return self.shared_expert_hidden or self.shared_experts * self.expert_hidden


FSDP_OPTION_NAMES = ("param_dtype", "reduce_dtype", "cpu_offload")
"""The ``parallel`` keys that are FSDP2 policies (docs/parallelism.md, Precision and offload)."""


@dataclass
class ParallelConfig:
    """How ranks are used: ``world = dp_replicate x dp_shard x tp``; expert parallelism borrows ``ep`` ranks from
    ``dp_shard`` and expert weights are FSDP-sharded over the data-parallel ranks left. The layout is checked against
    the world size and the model before the process group starts (see docs/parallelism.md)."""

    data: Literal["ddp", "fsdp"] = option(
        "fsdp", doc="Data-parallel wrapper: FSDP2 (fully_shard, any layout) or DDP (tp = ep = 1 only)."
    )
    tp: int = option(1, doc="Tensor-parallel ranks (attention heads, MLP, vocabulary).", min=1)
    ep: int = option(1, doc="Expert-parallel ranks (each holds num_experts / ep experts).", min=1)
    etp: int = option(
        0,
        doc="Expert tensor parallelism: 0 = same as tp (each expert's hidden dim split over tp); "
        "1 = whole experts on every tensor-parallel rank, each computing its own sequence slice.",
        min=0,
    )
    dp_replicate: int = option(
        1, doc="HSDP: replicate groups of the data-parallel ranks (1 = plain FSDP over all of them).", min=1
    )
    sequence_parallel: bool = option(
        True, doc="With tp > 1, split norms and the MoE input along the sequence (Megatron-style)."
    )
    timeout_s: int = option(
        600, doc="Collective timeout in seconds: a rank that hangs fails the job after this.", min=1
    )
    param_dtype: Literal["fp32", "bf16"] = option(
        "fp32",
        doc="FSDP2 mixed precision: dtype of the all-gathered (unsharded) weights, so of the blocks' compute and the "
        "parameter all-gather. The sharded master weights, their gradients and the optimizer state stay fp32. "
        "fsdp on 2+ data-parallel ranks only (docs/parallelism.md, Precision and offload).",
    )
    reduce_dtype: Literal["fp32", "bf16"] = option(
        "fp32",
        doc="FSDP2 gradient reduce-scatter dtype (also of gradient accumulation between reductions); fp32 keeps "
        "the sum exact to fp32 round-off, bf16 halves the traffic. fsdp on 2+ data-parallel ranks only.",
    )
    cpu_offload: bool = option(
        False,
        doc="FSDP2 CPU offload: sharded weights, gradients and optimizer state live in host memory and the "
        "optimizer steps on the CPU; each block's shard is copied to the GPU for its all-gather. For few GPUs; "
        "needs train.device cuda or auto, fsdp on 2+ data-parallel ranks.",
    )

    @property
    def resolved_etp(self) -> int:
        return self.tp if self.etp == 0 else self.etp

    def fsdp_options(self) -> dict[str, tuple[object, object]]:
        """The FSDP2 precision and offload keys set away from their defaults: name -> (value, default). Empty means
        plain fp32 FSDP2."""
        return {
            f.name: (getattr(self, f.name), f.default)
            for f in dataclasses.fields(self)
            if f.name in FSDP_OPTION_NAMES and getattr(self, f.name) != f.default
        }

    def validate(self, prefix: str) -> None:
        if self.etp not in (0, 1, self.tp):
            raise ConfigError(
                f"{prefix}.etp", self.etp, f"expected 0 (same as tp), 1 or parallel.tp={self.tp}"
            )


@dataclass
class DataConfig:
    """Training data: the embedded corpus or prepared indexed datasets."""

    paths: list[str] = option(
        default_factory=list,
        doc="Prefixes of prepared .bin/.idx datasets (from `expertrain data prepare`); empty = the embedded corpus.",
    )
    weights: list[float] = option(default_factory=list, doc="Blend weights, one per path (empty = equal).")
    tokenizer: str = option("", doc="Folder with tokenizer.json; empty = the embedded corpus tokenizer.")
    seq_len: int = option(256, doc="Tokens per training sequence.", min=2)
    val_fraction: float = option(
        0.05,
        doc="Share of documents held out for validation (5% of the embedded corpus is ~90 files).",
        min=0.0,
        max=0.5,
    )
    cache_dir: str = option(
        "", doc="Where the embedded corpus and its tokenizer are cached; empty = ~/.cache/expertrain."
    )
    val_seed: int = option(
        0,
        doc="Seed of the validation samples, apart from train.seed: runs with any seed or data-parallel layout are "
        "scored on the same held-out text.",
        min=0,
    )

    def validate(self, prefix: str) -> None:
        if self.weights and len(self.weights) != len(self.paths):
            raise ConfigError(
                f"{prefix}.weights", self.weights, f"expected one weight per path ({len(self.paths)})"
            )


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = option(3e-3, doc="Peak learning rate.", min=0.0)
    min_lr_ratio: float = option(0.1, doc="Final learning rate as a fraction of lr.", min=0.0, max=1.0)
    warmup_steps: int = option(20, doc="Linear warmup steps.", min=0)
    decay_steps: int = option(
        0,
        doc="Steps of the cosine decay after warmup, then min_lr_ratio * lr; 0 = to the end of the run "
        "(train.steps), which ties the schedule to train.steps: set it to extend a run exactly.",
        min=0,
    )
    weight_decay: float = option(
        0.1, doc="Decoupled weight decay (not applied to norms, biases, router biases).", min=0.0
    )
    beta1: float = option(0.9, doc="AdamW beta1.", min=0.0, max=1.0)
    beta2: float = option(0.95, doc="AdamW beta2.", min=0.0, max=1.0)
    eps: float = option(1e-8, doc="AdamW epsilon.", min=0.0, min_exclusive=True)
    grad_clip: float = option(1.0, doc="Clip the global gradient norm to this (0 = off).", min=0.0)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = option(100, doc="Optimizer steps.", min=1)
    seed: int = option(0, doc="Seed for weights, data order and dropout.", min=0)
    global_batch_size: int = option(16, doc="Sequences per optimizer step, independent of world size.", min=1)
    micro_batch_size: int = option(
        4, doc="Sequences per rank per forward; accumulation = global / (data-parallel ranks * micro).", min=1
    )
    dtype: Literal["fp32", "bf16"] = option(
        "fp32", doc="Compute dtype: bf16 autocast keeps fp32 master weights."
    )
    activation_checkpointing: bool = option(False, doc="Recompute each block in backward to save memory.")
    compile: bool = option(False, doc="torch.compile each transformer block.")
    eval_every: int = option(
        50, doc="Evaluate validation loss every N steps (and at the end); 0 = only at the end.", min=0
    )
    eval_batches: int = option(
        8,
        doc="Validation micro-batches per evaluation: eval_batches x micro_batch_size sequences in all, shared "
        "round-robin over the data-parallel ranks (the same text for every layout).",
        min=1,
    )
    sample_tokens: int = option(48, doc="Tokens of generated text shown at the end (0 = none).", min=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", doc="Where to train; auto = cuda when available.")
    deterministic: bool = option(
        False,
        doc="Deterministic kernels (torch.use_deterministic_algorithms, a fixed cuBLAS workspace, MoE sums in a fixed "
        "order): a resumed run repeats the uninterrupted one bit for bit on CUDA too (docs/gpu.md). Slower.",
    )
    engine: Literal["native", "deepspeed"] = option(
        "native",
        doc="Who reduces gradients and steps the optimizer: native = DDP/FSDP2 (parallel.*), deepspeed = DeepSpeed "
        "ZeRO (the deepspeed section; docs/deepspeed.md).",
    )


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO, used when ``train.engine`` is ``deepspeed`` (docs/deepspeed.md); ``parallel.data`` is then unused."""

    zero_stage: int = option(
        2,
        doc="ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = also gradients, 3 = also "
        "parameters (not with parallel.ep > 1).",
        min=0,
        max=3,
    )
    overlap_comm: bool = option(
        False, doc="Overlap gradient reduction with the backward pass (uses CUDA streams; no gain on CPU)."
    )
    reduce_bucket_size: int = option(
        500_000_000,
        doc="Elements per gradient-reduction bucket (stages 1-3); smaller uses less memory, more messages.",
        min=1,
    )
    allgather_bucket_size: int = option(
        500_000_000,
        doc="Elements per all-gather bucket that redistributes updated parameters after the step (stages 1-2).",
        min=1,
    )


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (torch distributed checkpoint) under run.dir/checkpoints."""

    every: int = option(0, doc="Save every N steps (0 = only at the end).", min=0)
    keep_last: int = option(
        2, doc="Checkpoints kept; older ones are deleted after a new one is in place.", min=1
    )
    resume: bool = option(True, doc="Continue from the latest checkpoint in run.dir if there is one.")
    save_final: bool = option(True, doc="Save a checkpoint after the last step.")
    save_on_signals: list[str] = option(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        doc="Signals that stop the job cleanly: every rank finishes the current step, a checkpoint is saved and the "
        "job exits with code 75 (resume by rerunning it); a rank still running parallel.timeout_s after the signal "
        "is taken as hung and exits. Empty = the signals keep their default action.",
    )
    on_damaged: Literal["fallback", "fail"] = option(
        "fallback",
        doc="A latest checkpoint that fails verification (a file missing, truncated or changed against its "
        "manifest): fallback = warn and resume from the newest intact one; fail = stop with one line naming the file.",
    )


@dataclass
class LoggingConfig:
    """Console, metrics and plots."""

    log_every: int = option(1, doc="Write metrics every N steps.", min=1)
    tensorboard: bool = option(True, doc="Also write TensorBoard events to run.dir/tb.")
    progress: bool = option(True, doc="Show a progress bar on rank 0.")
    plots: bool = option(True, doc="Write loss.png and expert_load.png at the end.")


@dataclass
class RunConfig:
    """Where results go."""

    dir: str = option("", doc="Run folder; empty = runs/<config file name>.")
    name: str = option("", doc="Run name for logs; empty = the config file name.")


@dataclass
class SFTDataConfig:
    """Supervised fine-tuning data: chat JSONL files, loss on assistant tokens only (docs/sft.md)."""

    train_files: list[str] = option(
        default_factory=list,
        doc='JSONL files of training rows, {"messages": [{"role", "content"}, ...]} or {"prompt", "response"}.',
    )
    val_file: str = option(
        "", doc="JSONL file of validation rows; empty = hold out val_fraction of the rows."
    )
    val_fraction: float = option(
        0.0,
        doc="Share of the training rows held out for validation (seeded, exact count) when val_file is empty; "
        "0 = no validation.",
        min=0.0,
        max=0.5,
    )
    packing: bool = option(
        True,
        doc="Pack several samples into each sequence (positions restart per sample); false = one sample per "
        "sequence, padded.",
    )
    truncation: Literal["truncate", "drop"] = option(
        "truncate",
        doc="A sample longer than the sequence: truncate = keep its start (dropped if no response token is left), "
        "drop = drop it. Both are counted.",
    )
    on_bad_row: Literal["skip", "error"] = option(
        "error",
        doc="A malformed row: error = stop naming file:line; skip = count it and print one summary line.",
    )
    seed: int = option(0, doc="Seed of the validation split and of the sample order before packing.", min=0)
    eval_exact_match: int = option(
        0,
        doc="At the end of training answer the first N rows of val_file greedily (the last assistant turn is the "
        "reference) and report the exact-match accuracy; 0 = off.",
        min=0,
    )
    eval_max_new_tokens: int = option(32, doc="Longest answer generated for eval_exact_match.", min=1)

    def validate(self, prefix: str) -> None:
        if self.eval_exact_match and not self.val_file:
            raise ConfigError(
                f"{prefix}.eval_exact_match",
                self.eval_exact_match,
                f"expected 0 without {prefix}.val_file (the rows to answer come from it)",
            )
        if self.val_file and self.val_fraction > 0:
            raise ConfigError(
                f"{prefix}.val_fraction",
                self.val_fraction,
                f"expected 0 when {prefix}.val_file is set (use one way to get validation rows)",
            )


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "sft": SFTDataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "run": RunConfig,
}
