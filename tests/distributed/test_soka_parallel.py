"""SoKA under tensor and expert parallelism, with the real trainer on spawned gloo ranks: ``tp=2`` (factors sharded
with their layers, expert tensor parallelism on the routed experts) and ``ep=2`` (per-expert factors cut with their
experts) train the same model as one rank — losses, step-1 gradients, the final trained tensors read back from each
run's final checkpoint — and both exports (``soka``, ``hf --merge``) of those checkpoints match one rank's.

Both layers are MoE (so the merged model exports to Hugging Face as Mixtral): ``all-linear`` takes attention
(``q/k/v_proj`` column-parallel, ``o_proj`` row-parallel), ``target_experts`` the routed experts. The layouts train inside the shared per-world spawns
(``layouts.py``). Tolerances as in test_lora.py (fp32): step-1 gradients to 1e-5 relative (sums over ranks reorder
additions), losses over 3 steps to 1e-3 relative; final tensors and exports to 2e-6 absolute (weights of order
0.02-1 moved by ~1e-3 per step).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import export_hf, export_plugin_format, load_model
from plugins.peft import soka
from tests.distributed.layouts import assert_matches_one_rank, assert_tensors_close, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

SOKA = (
    "plugins=[soka]",
    "moe.every=1",  # all layers MoE: the merged model exports as Mixtral
    "soka.max_rank=4",
    "soka.target_experts=true",
    "optim.weight_decay=0.1",
    "checkpoint.save_final=true",
)
FSDP = "parallel.data=fsdp"
LAYOUTS = {
    "soka-par-tp2": (*SOKA, FSDP, "parallel.tp=2"),
    "soka-par-ep2": (*SOKA, FSDP, "parallel.ep=2"),
}
register(1, {"soka-par-one": SOKA})
register(2, LAYOUTS)


def _trained(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every SoKA tensor (factors, initial factors, ranks) and every weight, from the final checkpoint."""
    model, _, _, _ = load_model(run_dir)
    keep = ("soka_", "weight", "_proj")
    return {n: t.detach() for n, t in model.state_dict().items() if any(k in n for k in keep)}


def _exports(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """``expertrain export soka`` and ``export hf --merge`` of the run's final checkpoint, prefixed by format."""
    export_plugin_format(run_dir, out / "soka", "soka")
    export_hf(run_dir, out / "hf", merge=True)
    tensors = {f"soka:{k}": v for k, v in load_file(str(out / "soka" / "soka_model.safetensors")).items()}
    tensors |= {f"hf:{k}": v for k, v in load_file(str(out / "hf" / "model.safetensors")).items()}
    return tensors


def test_tensor_and_expert_parallel_train_the_same_model_as_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]], tmp_path: Path
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["soka-par-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    model, _, _, _ = load_model(one_root / "soka-par-one")
    names = soka.factor_parameter_names(model)
    # The factors only get gradients: 4 attention projections and 2 expert weights per layer, A and B each.
    assert set(ref["grads"]) == set(names) and len(names) == 2 * 2 * (4 + 2)
    assert any("experts.soka_gate_up_proj" in n for n in names)
    ref_trained = _trained(one_root / "soka-par-one")
    factors = [k for k in ref_trained if k.endswith(("soka_A", "soka_B"))]
    assert all(not torch.equal(ref_trained[k], ref_trained[k + "0"]) for k in factors)  # every factor trained
    ref_exports = _exports(one_root / "soka-par-one", tmp_path / "one")
    assert any(k.startswith("hf:") and "experts" in k for k in ref_exports)

    parallel, root = trained_layouts(2)
    for name in LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        trained = _trained(root / name)
        assert set(trained) == set(ref_trained)
        for key, value in ref_trained.items():
            if key.endswith("soka_rank"):
                assert torch.equal(trained[key], value), f"{name} {key}"
        floats = {k: v for k, v in ref_trained.items() if v.is_floating_point()}
        assert_tensors_close(name, {k: trained[k] for k in floats}, floats)
        exports = _exports(root / name, tmp_path / name)
        assert_tensors_close(name, exports, ref_exports)
