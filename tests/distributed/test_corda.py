"""CorDA with the real trainer on spawned gloo ranks: data parallelism (FSDP2, and DDP), tensor parallelism (tp=2,
with sequence parallelism, with and without expert tensor parallelism) and expert parallelism (ep=2) calibrate the same
decomposition and train the same adapters as one rank: losses, step-1 gradients and the final adapters, residual
bases and initial factors, read back from each run's final checkpoint (which also checks that sharded adapters and
residual expert weights are saved whole). From the tp=2 and ep=2 checkpoints, ``expertrain export peft`` (the
rank-2r adapter on the original base, expert deltas included) and the merged weights of ``export hf --merge`` equal
the one-rank ones.

The model has an MoE layer (0) and a dense layer (1): ``all-linear`` adapts attention (column- and row-parallel
projections) and the dense MLP, ``target_experts`` the routed experts (per-expert covariances from the routed
tokens; cut over ``ep``, split on their hidden dimension under ``tp``). Every rank runs the same calibration
samples; under tp the row-parallel inputs and the MoE layer's routed sequence slices are gathered, so every layout
decomposes the same covariances.

Tolerances as in test_lora.py (fp32): step-1 gradients 1e-5 relative, losses over 3 steps 1e-3 relative, final
adapters 2e-6 absolute. Residual bases and initial factors are computed once before training and frozen: 1e-6
absolute (the calibration sums are reordered by the layouts; the fp64 decomposition of covariances that differ by
~1e-7 relative moves the fp32 factors by less than that). Measured: at most 3e-8 (dp2), 1e-7 (tp2, with
etp = tp or 1), 1.5e-8 (ep2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import export_plugin_format, load_model
from plugins.peft.corda import corda_experts, corda_modules, initial_factors
from tests.distributed.layouts import assert_matches_one_rank, assert_tensors_close, register

pytestmark = pytest.mark.timeout(900)  # may be the test that trains every shared layout (layouts.py)

CORDA = (
    "plugins=[corda]",
    "moe.every=2",
    "corda.targets=all-linear",
    "corda.target_experts=true",
    "corda.r=4",
    "corda.alpha=8",
    "corda.calibration_samples=4",
    "checkpoint.save_final=true",
)
FSDP = "parallel.data=fsdp"
LAYOUTS = {
    "corda-dp2-fsdp": (*CORDA, FSDP),
    "corda-dp2-ddp": (*CORDA, "parallel.data=ddp"),
    "corda-tp2": (*CORDA, FSDP, "parallel.tp=2"),
    "corda-tp2-etp1": (*CORDA, FSDP, "parallel.tp=2", "parallel.etp=1"),
    "corda-ep2": (*CORDA, FSDP, "parallel.ep=2"),
}
register(1, {"corda-one": CORDA})
register(2, LAYOUTS)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _, _ = load_model(run_dir)
    out: dict[str, torch.Tensor] = {}
    for path, m in corda_modules(model):
        for name, t in (("weight", m.weight), ("A", m.lora.lora_A), ("B", m.lora.lora_B)):
            out[f"{path}.{name}"] = t.detach()
    for path, experts in corda_experts(model):
        for name, lora in experts.adapters().items():
            out[f"{path}.{name}"] = getattr(experts, name).detach()
            out[f"{path}.{name}.A"], out[f"{path}.{name}.B"] = lora.lora_A.detach(), lora.lora_B.detach()
    out.update({k: v.detach() for k, v in initial_factors(model).items()})
    return out


def _exports(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """What ``expertrain export peft`` writes, and the weights ``expertrain export hf --merge`` writes (the merged
    model's state before the transformers renaming), from the run's final checkpoint."""
    export_plugin_format(run_dir, out, "peft")
    tensors = {f"peft:{k}": v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    model, config, pm, _ = load_model(run_dir)
    pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config)
    tensors.update({f"merged:{k}": v.detach() for k, v in model.state_dict().items()})
    return tensors


def _frozen(key: str) -> bool:
    return key.endswith((".weight", "_proj", ".lora_A0", ".lora_B0"))


def test_dp_tp_ep_calibrate_and_train_the_same_as_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
) -> None:
    ones, one_root = trained_layouts(1)
    ref = ones["corda-one"]
    assert isinstance(ref, dict), f"one rank failed:\n{ref}"
    ref_state = _state(one_root / "corda-one")
    for part in ("ffn.down_proj.weight", "attention.o_proj.A", "experts.gate_up_proj.A", "experts.down_proj"):
        assert any(k.endswith(part) for k in ref_state), part
    assert all("lora" in n for n in ref["grads"])  # only the adapters get gradients
    assert any("experts.lora_down_proj" in n for n in ref["grads"])

    parallel, root = trained_layouts(2)
    worst: dict[str, float] = {}
    for name in LAYOUTS:
        got = parallel[name]
        assert_matches_one_rank(name, got, ref)
        state = _state(root / name)
        assert set(state) == set(ref_state)
        for key, t in ref_state.items():
            worst[name] = max(worst.get(name, 0.0), float((state[key] - t).abs().max()))
            torch.testing.assert_close(
                state[key],
                t,
                rtol=0,
                atol=1e-6 if _frozen(key) else 2e-6,
                msg=lambda m, n=name, k=key: f"{n} {k}: {m}",
            )
    print(f"largest difference to one rank: {worst}")


def test_exports_from_tp_and_ep_checkpoints_equal_one_rank(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]], tmp_path: Path
) -> None:
    ones, one_root = trained_layouts(1)
    parallel, root = trained_layouts(2)
    ref = _exports(one_root / "corda-one", tmp_path / "one")
    assert (
        any("mlp.experts.base_layer.lora_A" in k for k in ref)
        and "merged:layers.0.ffn.experts.down_proj" in ref
    )
    assert not any("lora" in k for k in ref if k.startswith("merged:"))
    for name in ("corda-tp2", "corda-ep2"):
        assert isinstance(parallel[name], dict), f"{name} failed:\n{parallel[name]}"
        assert_tensors_close(name, _exports(root / name, tmp_path / name), ref)
