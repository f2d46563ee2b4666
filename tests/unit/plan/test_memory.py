"""The memory planner: shard sizes from the meta build against real process groups, the activation count against
the tensors autograd really saves, a Qwen3-30B-A3B-shaped build on meta at 64 ranks, and the plan's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from framework.plan.build import build_on_meta, plan_job_config
from framework.plan.memory import activation_bytes, plan_memory
from tests.distributed.spawn import run_ranks

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = str(REPO / "examples" / "configs" / "quickstart.yaml")
QWEN3_30B = REPO / "examples" / "models" / "qwen3-30b-a3b"
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=96",
    "model.max_seq_len=64",
    "moe.num_experts=4",
    "moe.expert_hidden=48",
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
]
LAYOUTS_OF_TWO_RANKS = [
    ["parallel.data=fsdp", "parallel.ep=2"],
    ["parallel.data=fsdp", "parallel.tp=2"],
    ["parallel.data=fsdp", "moe.num_experts=1", "moe.top_k=1"],
]
"""Expert parallelism with FSDP2 over the dense weights; tensor parallelism with sequence parallelism; one expert
over two FSDP ranks (cut on a hidden dimension, not on the expert dimension)."""


def _local_parameter_bytes(rank: int, world: int, layouts: list[list[str]]) -> list[int]:
    """On a real gloo rank, per layout: the model built on CPU, parallelised by the project's parallel code, the
    bytes of its local parameter shards."""
    return [_local_bytes_of(world, TINY + layout) for layout in layouts]


def _local_bytes_of(world: int, overrides: list[str]) -> int:
    from torch.distributed.tensor import DTensor

    from framework.models import Transformer
    from framework.parallel.data_parallel import wrap_data_parallel
    from framework.parallel.expert_parallel import parallelize_moe
    from framework.parallel.mesh import build_meshes
    from framework.parallel.tensor_parallel import apply_tensor_parallel

    config, pm, layout, _, _ = plan_job_config(world, QUICKSTART, overrides)
    model = Transformer(config.model, config.moe, pm.registry)
    meshes = build_meshes(layout, torch.device("cpu"))
    if meshes.tp is not None:
        apply_tensor_parallel(model, meshes.tp, layout.sequence_parallel)
    parallelize_moe(model, meshes)
    wrap_data_parallel(model, "fsdp", torch.device("cpu"), meshes)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def test_planned_parameter_bytes_equal_the_local_shards_of_real_gloo_ranks() -> None:
    real = run_ranks(_local_parameter_bytes, 2, LAYOUTS_OF_TWO_RANKS)
    for i, layout in enumerate(LAYOUTS_OF_TWO_RANKS):
        config, pm, plan_layout, accumulation, notes = plan_job_config(2, QUICKSTART, TINY + layout)
        plan = plan_memory(build_on_meta(config, pm, plan_layout, accumulation, notes), "cpu")
        # Exact: rank 0 holds the largest FSDP shards, and the meta build runs the same parallel code.
        assert plan.bytes_of("parameters") == real[0][i], layout
        assert not dist.is_initialized()  # the fake process group is gone


def _saved_activation_bytes(overrides: list[str]) -> tuple[int, int, int]:
    """Bytes autograd saves for one micro-batch through the loss (storages counted once, parameters excluded), and
    the micro-batch's token count and the model's vocabulary and dim (for the head's own terms)."""
    import torch.nn.functional as F

    from framework.models import Transformer

    config, pm, _, _, _ = plan_job_config(1, QUICKSTART, overrides)
    model = Transformer(config.model, config.moe, pm.registry)
    if config.train.activation_checkpointing:
        model.enable_activation_checkpointing()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    B, S = config.train.micro_batch_size, config.data.seq_len
    ids = torch.randint(0, config.model.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    return sum(seen.values()), B * S, config.model.vocab_size + 2 * config.model.dim


@pytest.mark.parametrize(
    "extra", [[], ["model.qk_norm=true"], ["moe.num_experts=0"]], ids=["moe", "moe-qk-norm", "dense"]
)
def test_activations_kept_match_the_tensors_autograd_saves(extra: list[str]) -> None:
    overrides = TINY + extra
    measured, tokens, head_elements = _saved_activation_bytes(overrides)
    config, pm, layout, accumulation, notes = plan_job_config(1, QUICKSTART, overrides)
    planned = activation_bytes(build_on_meta(config, pm, layout, accumulation, notes))
    # The forward's saved set is the blocks' (planned.saved) plus the head's final norm input/output and the
    # log-softmax output (2D + V per token, fp32). Tolerance 2%: the norms' per-row 1/rms (one float per token and
    # norm) and a few index tensors are not counted.
    expected = planned.saved + tokens * head_elements * 4
    assert measured == pytest.approx(expected, rel=0.02)


def test_qwen3_30b_a3b_builds_on_meta_at_64_ranks_with_its_parameter_count_and_little_memory() -> None:
    hf = json.loads((QWEN3_30B / "config.json").read_text())
    d, layers, hd, v = hf["hidden_size"], hf["num_hidden_layers"], hf["head_dim"], hf["vocab_size"]
    attention = d * hd * (2 * hf["num_attention_heads"] + 2 * hf["num_key_value_heads"]) + 2 * hd
    experts = hf["num_experts"] * 3 * d * hf["moe_intermediate_size"] + hf["num_experts"] * d
    expected = 2 * v * d + d + layers * (attention + experts + 2 * d)  # 30,532,122,624: the published 30.5B
    script = (
        "import json, resource\n"
        "from framework.plan.command import make_plan\n"
        "def rss(key):\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith(key)][0]\n"
        "    return int(line.split()[1]) * 1024\n"
        "import framework.plan.build, framework.models, torch.distributed.tensor\n"
        "before = rss('VmRSS:')\n"
        f"plan = make_plan(64, hf_config={str(QWEN3_30B)!r}, overrides=['parallel.ep=8', "
        "'data.seq_len=4096', 'train.micro_batch_size=1', 'train.global_batch_size=64'])\n"
        "print(json.dumps({'params': plan.model['total_params'], 'growth': rss('VmHWM:') - before}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params"] == expected
    assert result["growth"] < 2**30  # a meta build: no weights, well under 1 GiB of peak RSS growth


def test_plan_total_is_the_sum_of_its_lines_and_the_verdict_follows_the_capacity() -> None:
    config, pm, layout, accumulation, notes = plan_job_config(1, QUICKSTART, TINY)
    job = build_on_meta(config, pm, layout, accumulation, notes)
    plan = plan_memory(job, "cuda", capacity_bytes=2 * 2**30)
    assert plan.total_bytes == sum(line.bytes for line in plan.lines)
    assert plan.fits is True
    assert plan_memory(job, "cuda", capacity_bytes=plan.total_bytes - 1).fits is False
    # AdamW keeps two fp32 states per trainable element; gradients one.
    assert plan.bytes_of("optimizer state") == 2 * plan.bytes_of("gradients")


def test_fsdp_gathers_the_tensor_and_expert_parallel_shards_whole_over_the_data_parallel_ranks() -> None:
    # 4 ranks, tp=2 x ep=2, FSDP over the data-parallel ranks: what a block's all-gather rebuilds is the tp/ep shard.
    config, pm, layout, accumulation, notes = plan_job_config(
        4, QUICKSTART, [*TINY, *LAYOUTS_OF_TWO_RANKS[0], "parallel.tp=2"]
    )
    job = build_on_meta(config, pm, layout, accumulation, notes)
    d, v, e, i = config.model.dim, config.model.vocab_size, config.moe.num_experts, config.moe.expert_hidden
    root = sum(s.gathered_numel for s in job.shards if s.unit in ("embedding", "head", "root"))
    assert root == v * d // 2 * 2 + d  # embedding and head split over tp (vocabulary), final norm whole
    experts = sum(
        s.gathered_numel for s in job.shards if ".experts." in s.name and s.name.startswith("layers.0.")
    )
    assert experts == e * 3 * d * i // (2 * 2)  # E/ep experts, each split over tp on its hidden dimension


def test_cpu_fsdp_allocator_line_adds_one_gathered_copy_of_the_tensors_under_glibcs_mmap_ceiling() -> None:
    # 2 FSDP ranks gather every tensor whole. With a 65536 x 128 vocabulary the embedding and the head are 32 MiB
    # each in fp32: at glibc's mmap ceiling, so they are mapped and unmapped and glibc keeps nothing of them.
    def allocator_extra(overrides: list[str]) -> tuple[int, int]:
        config, pm, layout, accumulation, notes = plan_job_config(2, QUICKSTART, [*TINY, *overrides])
        job = build_on_meta(config, pm, layout, accumulation, notes)
        plan = plan_memory(job, "cpu")
        share = 0.5 * (plan.bytes_of("activations") + plan.bytes_of("gradients"))
        assert plan_memory(job, "cuda").bytes_of("allocator") == 0
        return plan.bytes_of("allocator") - int(share), job.total_params

    extra, params = allocator_extra(["parallel.data=fsdp"])
    assert extra == params * 4 * 2  # every parameter's gathered copy and its gradient, fp32
    extra, params = allocator_extra(["parallel.data=fsdp", "model.vocab_size=65536", "model.dim=128"])
    assert extra == (params - 2 * 65536 * 128) * 4 * 2
    ddp, _ = allocator_extra(["parallel.data=ddp"])
    assert ddp == 0  # DDP gathers nothing
