"""examples/configs/mola.yaml trains under torchrun on two ranks (tiny shapes): only the MoLA adapters change, and
``expertrain export mola`` writes the adapters of the final checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import load_model
from framework.cli import main as cli_main
from framework.models import Transformer
from plugins.moe.mola import mola_modules
from plugins.peft.low_rank import experts_from_peft
from tests.integration.launch import REPO, run_training

MOLA_EXAMPLE = REPO / "examples" / "configs" / "mola.yaml"


def test_mola_example_trains_only_adapters_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    proc = run_training(run_dir, ["train.steps=3", "checkpoint.every=0"], nproc=2, config=MOLA_EXAMPLE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # TINY has 2 layers (MoE, dense): the inverted triangle gives [2, 4] experts; coverage line on rank 0 only.
    coverage = re.findall(
        r"^mola: adapted (\d+) projections .*experts per layer \[2, 4\].*trainable", proc.stdout, re.M
    )
    assert coverage == ["11"]  # q/k/v/o in both layers + gate/up/down of the dense layer
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r["loss/mola_balance"] > 0 for r in records)
    assert sum(records[0][f"mola/layer1.gate_proj/tokens_e{j}"] for j in range(4)) == 4 * 32 * 2

    model, config, _, _ = load_model(run_dir)
    fresh = Transformer(config.model, config.moe)
    fresh.init_weights(config.train.seed)
    trained = model.state_dict()
    for name, init in fresh.state_dict().items():
        assert torch.equal(trained[name], init), f"base weight {name} changed"  # frozen: bit-identical
    modules = dict(mola_modules(model))
    assert len(modules) == 11
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in modules.values())  # B starts at 0: trained

    out = tmp_path / "adapter"
    assert cli_main(["export", "mola", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json", "export.json"}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 3 * len(modules)  # MoLA tensors only
    for path, m in modules.items():
        key = f"base_model.model.{path}"
        A, B = experts_from_peft(
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], m.num_experts
        )
        assert torch.equal(A, m.lora_A.detach()) and torch.equal(B, m.lora_B.detach())
        assert torch.equal(tensors[f"{key}.router.weight"], m.router.weight.detach())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["experts_per_layer"] == [2, 4]
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["top_k"]) == (8, 16.0, 2)
    assert adapter_config["base_model"]["model"]["n_layers"] == 2

    capsys.readouterr()
    missing = tmp_path / "missing"
    assert cli_main(["export", "gguf", "--checkpoint", str(run_dir), "--output", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        "export format 'gguf' is not available" in err
        and "no plugin of its job provides it (plugins: mola)" in err
    )
    assert not missing.exists()
