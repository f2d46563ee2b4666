"""Every example config in ``examples/configs`` trains end to end on two gloo ranks, shrunk to the
tiny test model by ``TINY`` overrides: here, or in the integration test that checks what the example is about
(the guard below fails when an example is run by none)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.launch import REPO, run_training

EXAMPLES = REPO / "examples" / "configs"


def test_every_example_config_is_run_by_an_integration_test() -> None:
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    quickstart_default = "QUICKSTART" in (Path(__file__).parent / "launch.py").read_text()
    for config in sorted(EXAMPLES.glob("*.yaml")):
        ran = f'"{config.name}"' in sources or (config.name == "quickstart.yaml" and quickstart_default)
        assert ran, (
            f"no integration test runs examples/configs/{config.name}: add it to test_example_configs.py"
        )


def test_deepseek_v3_example_trains_on_two_ranks(tmp_path: Path) -> None:
    """``deepseek_v3_moe.yaml``: sigmoid scores, aux-loss-free bias (moves after every step), sequence-wise aux loss,
    group-limited routing, a dense first layer."""
    run_dir = tmp_path / "run"
    proc = run_training(run_dir, [], nproc=2, config=EXAMPLES / "deepseek_v3_moe.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss/seq_load_balance"] > 0 for r in records)
    assert "moe/layer0/tokens_e0" in records[0]  # layer 1 (the first after the dense one) is MoE layer 0


def test_deepseek_moe_example_trains_on_two_ranks(tmp_path: Path) -> None:
    """``deepseek_moe.yaml`` at the tiny shape (4 experts of hidden 32, top-2, split in 2, 2 isolated shared experts
    -> 6 routed experts per layer) on 2 ranks with its own ``parallel.ep=2``."""
    run_dir = tmp_path / "run"
    proc = run_training(run_dir, ["logging.plots=true"], nproc=2, config=EXAMPLES / "deepseek_moe.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel layout: dp=2 tp=1 ep=2" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["loss/load_balance"] > 0 and r["loss/device_balance"] > 0 and r["loss/router_z"] > 0
        # Exact routing counts over the 6 routed experts: every token of the global batch (4 x 32) picks 2.
        for layer in (0, 1):
            assert sum(r[f"moe/layer{layer}/tokens_e{e}"] for e in range(6)) == 4 * 32 * 2
            assert f"moe/layer{layer}/tokens_e6" not in r
    assert (run_dir / "expert_load.png").stat().st_size > 0
    assert (run_dir / "summary.json").is_file()
    # The export rebuilds the block from the saved job (the plugin reads its section when validating it).
    from safetensors.torch import load_file

    from framework.cli import main as cli_main

    assert (
        cli_main(["export", "native", "--checkpoint", str(run_dir), "--output", str(tmp_path / "out")]) == 0
    )
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert (
        exported["layers.0.ffn.experts.gate_up_proj"].shape[0] == 6
    )  # all routed experts, gathered from ep=2
    assert "layers.0.ffn.shared_experts.gate_proj.weight" in exported
