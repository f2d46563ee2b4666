"""examples/configs/chain_of_experts.yaml end to end: torchrun, two gloo ranks, expert parallelism (TINY shapes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.integration.launch import REPO, run_training

EXAMPLE = REPO / "examples" / "configs" / "chain_of_experts.yaml"


def test_example_trains_with_per_iteration_routing_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "train.steps=3",
        "train.sample_tokens=0",
        "checkpoint.save_final=false",
        "logging.plots=true",
    ]
    proc = run_training(run_dir, overrides, nproc=2, config=EXAMPLE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps)

    # TINY: 2 MoE layers, 4 experts, top-2 as 2 iterations of top-1; global batch 4 x 32 tokens. Exact counts,
    # all-reduced over both ranks: every token is routed to one expert in each iteration of each layer.
    first = steps[0]
    for layer in (0, 1):
        assert f"moe/layer{layer}/tokens_e0" not in first, "counts must be split by iteration"
        for iteration in (0, 1):
            routed = sum(first[f"moe/layer{layer}/iter{iteration}/tokens_e{e}"] for e in range(4))
            assert routed == 4 * 32, (layer, iteration)
    assert first["moe/a2a_remote_rows"] > 0, "expert parallelism should send tokens to the other rank"
    assert (run_dir / "expert_load.png").is_file()
