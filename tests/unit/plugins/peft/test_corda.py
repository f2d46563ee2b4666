"""The corda plugin: the damping loop, the context-oriented SVD and the ipm/kpm factors against the formulas of the
paper card, per-sample normalised covariances, an unchanged model at step 0, the frozen base under a real optimizer
step, checkpoint state, merge, refusals, and the rank-2r peft export loaded by real peft on the original base. With
``target_experts``: per-expert covariances against a direct computation from the routed rows, the plain-SVD fallback
of an expert no calibration token reaches, step 0 unchanged, merge, and the peft export of the expert deltas
(``target_parameters``) loaded by real peft with our logits.

Tolerances: the decomposition runs in fp64, so identities on it hold to ~1e-12 (we allow 1e-9). The model runs in
fp32: the residual base ``W − s·B₀A₀`` plus ``s·B·A`` rounds each weight once more (~1e-7 relative), which moves
logits of order 1 by ~1e-6, so logits are compared to 1e-5 absolute.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from framework.config import ConfigError, JobConfig, resolve, section_docs
from framework.config.sections import OptimConfig
from framework.hooks import PluginError, PluginManager
from framework.models import Transformer, default_registry
from framework.train.optim import build_optimizer
from plugins.peft import corda
from plugins.peft.corda import CorDALinear, CovarianceCollector
from plugins.peft.low_rank import LoRAExperts
from tests.unit.plugins.tiny_jobs import DENSE_JOB

LOGITS_TOL = {"atol": 1e-5, "rtol": 0.0}
REPO = Path(__file__).resolve().parents[4]
SMALL = DENSE_JOB
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = list(torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(1)).split(3))
MOE = {"num_experts": 4, "expert_hidden": 24, "every": 2}  # layer 0 MoE, layer 1 dense
EXPERTS = "layers.0.ffn.experts"


def _manager() -> PluginManager:
    pm = PluginManager(default_registry())
    pm.register_object("corda", corda)
    return pm


def _config(pm: PluginManager, section: dict[str, Any] | None = None, **sections: Any) -> JobConfig:
    raw: dict[str, Any] = {"plugins": ["corda"], **{k: dict(v) for k, v in SMALL.items()}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    raw["corda"] = {"r": 4, "alpha": 8.0, **(section or {})}
    return resolve(raw, pm.config_sections)


def _adapted(
    section: dict[str, Any] | None = None,
    before_calibration: Callable[[nn.Module], None] | None = None,
    **sections: Any,
) -> tuple[Transformer, Transformer, JobConfig, PluginManager]:
    """(calibrated corda model, the original base model, config, manager)."""
    pm = _manager()
    config = _config(pm, section, **sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    if before_calibration is not None:
        before_calibration(model)
    base = copy.deepcopy(model)
    pm.hook.expertrain_transform_model(model=model, config=config)
    corda.calibrate_and_init(model, CALIB, config.corda)
    return model, base, config, pm


def _train_adapters(model: nn.Module, seed: int = 1) -> None:
    """Move every A and B away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    adapters = [m.lora for _, m in corda.corda_modules(model)]
    adapters += [lora for _, m in corda.corda_experts(model) for lora in m.adapters().values()]
    with torch.no_grad():
        for lora in adapters:
            for p in (lora.lora_A, lora.lora_B):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# --- the math -----------------------------------------------------------------------------------------------------


def _spd(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    X = torch.randn(3 * n, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    P = torch.randn(rank, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (X @ P).T @ (X @ P) / (3 * n)


def test_damping_starts_at_001_and_doubles_until_invertible() -> None:
    C = _spd(12, 12)
    C_damped, inv, d = corda.damped_inverse(C)
    assert d == corda.DAMP_START  # a well-conditioned covariance takes the first damping
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(C_damped, C + 0.01 * torch.diagonal(C).mean() * eye)
    assert torch.dist(C_damped @ inv, eye) < corda.INV_TOL
    # The loop: with a strict tolerance d must double, and stop at the FIRST 0.01·2^k whose C̃ passes the test.
    C_bad = _spd(12, 3) + 1e-9 * eye

    def err(dd: float) -> float:
        Cd = C_bad + dd * torch.diagonal(C_bad).mean() * eye
        return float(torch.dist(Cd @ torch.linalg.inv(Cd), eye))

    tol = err(0.01) / 2
    _, _, d_bad = corda.damped_inverse(C_bad, tol)
    tried = [0.01 * 2**k for k in range(40) if 0.01 * 2**k < d_bad]
    assert d_bad > 0.01 and err(d_bad) < tol and all(err(dd) >= tol for dd in tried)
    with pytest.raises(ValueError, match="no non-zero input"):
        corda.damped_inverse(torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_decomposition_and_factors_follow_the_card(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    C = _spd(12, 5)  # rank-deficient: damping is what makes it invertible
    dec = corda.decompose(W, C)
    C_damped, C_inv, _ = corda.damped_inverse(C)
    # SVD(W C̃) = U S Vᵀ, V̂ᵀ = Vᵀ C̃⁻¹, and W = U S V̂ᵀ exactly (fp64).
    torch.testing.assert_close(dec.U @ torch.diag(dec.S) @ dec.Vhat_T, W, atol=1e-9, rtol=0)
    torch.testing.assert_close(dec.S, torch.linalg.svdvals(W @ C_damped), atol=1e-9, rtol=0)
    r, s = 3, 2.0
    B0, A0 = corda.corda_factors(dec, r, mode, s)
    idx = slice(0, r) if mode == "ipm" else slice(-r, None)
    torch.testing.assert_close(s * B0 @ A0, dec.U[:, idx] @ torch.diag(dec.S[idx]) @ dec.Vhat_T[idx])
    # A = √(S_r/s)·V̂_rᵀ and B = U_r·√(S_r/s): equal column/row scales.
    torch.testing.assert_close(B0.norm(dim=0), torch.sqrt(dec.S[idx] / s), atol=1e-9, rtol=0)
    # The frozen residual keeps the other components: its context-weighted spectrum is S without the adapted ones.
    residual = W - s * B0 @ A0
    rest = dec.S[r:] if mode == "ipm" else dec.S[:-r]
    got = torch.linalg.svdvals(residual @ C_damped)[: rest.shape[0]]
    torch.testing.assert_close(got, rest, atol=1e-9, rtol=0)
    assert (dec.S[idx].min() >= rest.max()) if mode == "ipm" else (dec.S[idx].max() <= rest.min())


def test_covariance_is_per_sample_normalised_and_averaged() -> None:
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(0))
    x[1] *= 100  # per-sample normalisation removes the scale of each sample
    collector = CovarianceCollector([("lin", lin)])
    lin(x[:2])
    lin(x[2:])
    collector.remove()
    normed = [xb.double() / xb.double().abs().max() for xb in x]
    expected = sum(xb.T @ xb for xb in normed) / 3
    torch.testing.assert_close(collector.covariances()["lin"], expected, atol=1e-12, rtol=0)
    lin(x)  # removed hooks collect nothing more
    assert collector.samples["lin"] == 3


# --- the plugin on a model ----------------------------------------------------------------------------------------


def test_coverage_step0_logits_unchanged_and_residual_base(capsys: pytest.CaptureFixture) -> None:
    model, base, config, _ = _adapted()
    out = capsys.readouterr().out
    assert "corda: adapted 14 linear modules (q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2" in out
    assert "mode=ipm, r=4, alpha=8" in out
    modules = corda.corda_modules(model)
    assert len(modules) == 14 and all(isinstance(m, CorDALinear) for _, m in modules)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), **LOGITS_TOL)
    originals = dict(base.named_modules())
    for path, m in modules:
        s = m.lora.scaling
        W = originals[path].weight
        assert not torch.allclose(m.weight, W), path  # the base is the residual, not W
        torch.testing.assert_close(m.weight + s * m.lora.lora_B @ m.lora.lora_A, W, atol=1e-6, rtol=0)
        assert torch.equal(m.lora.lora_A, m.lora_A0.to(m.lora.lora_A.dtype))


def test_kpm_adapts_smaller_components_than_ipm() -> None:
    ipm, _, _, _ = _adapted({"mode": "ipm"})
    kpm, base, _, _ = _adapted({"mode": "kpm"})
    with torch.no_grad():
        torch.testing.assert_close(kpm(IDS), base(IDS), **LOGITS_TOL)
    for (path, a), (_, b) in zip(corda.corda_modules(ipm), corda.corda_modules(kpm)):
        assert (a.lora_B0 @ a.lora_A0).norm() > (b.lora_B0 @ b.lora_A0).norm(), path


def test_base_is_frozen_no_gradient_no_optimizer_state() -> None:
    model, _, config, pm = _adapted()
    trainable = pm.trainable_names(model, config)
    assert trainable == set(corda.adapter_parameter_names(model)) and len(trainable) == 28
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    optimizer = build_optimizer(model, OptimConfig(), pm.param_groups(model, config), torch.device("cpu"))
    model(IDS).float().logsumexp(-1).mean().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    with_state = {n for n, p in params.items() if optimizer.state.get(p)}
    assert with_state == trainable and len(optimizer.state) == len(trainable)
    assert all(params[n].grad is None for n in params if n not in trainable)


def test_state_round_trips_and_a_different_model_is_refused() -> None:
    model, _, config, pm = _adapted()
    state = pm.plugin_state_dicts(model, config)["corda"]
    assert len(state) == 28 and all(torch.count_nonzero(v) > 0 for v in state.values())
    fresh = Transformer(config.model, config.moe, pm.registry)
    pm.hook.expertrain_transform_model(model=fresh, config=config)
    pm.load_plugin_state_dicts({"corda": state}, fresh, config)
    for (_, a), (_, b) in zip(corda.corda_modules(model), corda.corda_modules(fresh)):
        assert torch.equal(a.lora_A0, b.lora_A0) and torch.equal(a.lora_B0, b.lora_B0)
    with pytest.raises(PluginError, match="adapted modules differ"):
        pm.load_plugin_state_dicts({"corda": dict(list(state.items())[:2])}, fresh, config)


def test_merge_leaves_plain_linears_with_the_same_logits() -> None:
    model, _, config, pm = _adapted()
    _train_adapters(model)
    with torch.no_grad():
        expected = model(IDS)
    merged = pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config)["corda"]
    assert len(merged) == 14 and not corda.corda_modules(model)
    assert type(model.get_submodule("layers.0.attention.q_proj")) is nn.Linear
    assert not any("lora" in n for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, **LOGITS_TOL)


@pytest.mark.parametrize(
    ("section", "sections", "key"),
    [
        ({"target_experts": True}, {}, "corda.target_experts"),  # a dense model has no routed experts
        (
            {"target_experts": True},
            {"parallel": {"ep": 2}, "moe": MOE, "train": {"engine": "deepspeed"}},
            "corda.target_experts",
        ),
        ({"calibration_seq_len": 15}, {"parallel": {"tp": 2}}, "corda.calibration_seq_len"),
        ({"targets": []}, {}, "corda.targets"),
        ({"targets": [], "target_experts": True, "r": 30}, {"moe": MOE}, "corda.r"),  # expert_hidden 24
        ({"calibration_seq_len": 64}, {}, "corda.calibration_seq_len"),
        ({"targets": ["nope_proj"]}, {}, "corda.targets[0]"),
        ({"r": 40}, {}, "corda.r"),
    ],
)
def test_refusals_name_the_key(section: dict[str, Any], sections: dict[str, Any], key: str) -> None:
    pm = _manager()
    with pytest.raises(ConfigError) as err:
        config = _config(pm, section, **sections)
        pm.hook.expertrain_validate_config(config=config, world_size=2)
        model = Transformer(config.model, config.moe, pm.registry)
        pm.hook.expertrain_transform_model(model=model, config=config)
    assert err.value.key == key


# --- routed experts -----------------------------------------------------------------------------------------------


def test_expert_covariances_equal_a_direct_computation_from_the_routed_rows() -> None:
    pm = _manager()
    config = _config(pm, {"targets": [], "target_experts": True}, moe=MOE)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)
    layer = model.layers[0].ffn
    routed: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = layer.router.register_forward_hook(
        lambda mod, args, out: routed.append((args[0].detach().double(), out.topk_ids_TK))
    )
    # Short samples (2 tokens, top-2 of 4 experts), so that some samples miss some experts.
    calib = list(torch.randint(0, 64, (8, 2), generator=torch.Generator().manual_seed(2)).split(4))
    _, got = corda.collect_covariances(model, calib)
    hook.remove()
    # Direct: per calibration sample, the rows routed to expert e (and their hidden activation), each divided by its
    # own max|X| within that sample; averaged over the samples that reached e.
    w = layer.experts.gate_up_proj.detach().double()  # [E, 2, I, H]
    E, H, hidden = 4, 32, 24
    sums = {"gate_up_proj": torch.zeros(E, H, H, dtype=torch.float64)}
    sums["down_proj"] = torch.zeros(E, hidden, hidden, dtype=torch.float64)
    counts = torch.zeros(E)
    for x_TD, ids_TK in routed:
        for x_SD, ids_SK in zip(x_TD.view(4, 2, H), ids_TK.view(4, 2, -1)):
            for e in range(E):
                rows = x_SD[(ids_SK == e).any(dim=-1)]
                if rows.shape[0] == 0:
                    continue
                h = torch.nn.functional.silu(rows @ w[e, 0].T) * (rows @ w[e, 1].T)
                for name, value in (("gate_up_proj", rows), ("down_proj", h)):
                    value = value / value.abs().max()
                    sums[name][e] += value.T @ value
                counts[e] += 1
    # Every expert got rows, but not from every sample: the average is over the samples that reached it.
    assert len(routed) == 2 and bool((counts > 0).all()) and bool((counts < 8).any())
    for name, expected in sums.items():
        for e in range(E):
            torch.testing.assert_close(
                got[f"{EXPERTS}.{name}"][e], expected[e] / counts[e], atol=1e-12, rtol=0
            )


def test_experts_step0_logits_unchanged_and_residual_fused_weights(capsys: pytest.CaptureFixture) -> None:
    model, base, config, pm = _adapted({"target_experts": True}, moe=MOE)
    assert "and the routed experts of 1 MoE layers (4 experts)" in capsys.readouterr().out
    experts = model.get_submodule(EXPERTS)
    assert isinstance(experts, LoRAExperts)
    assert f"{EXPERTS}.lora_down_proj.lora_A" in pm.trainable_names(model, config)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), **LOGITS_TOL)
    original = base.get_submodule(EXPERTS)
    for name, lora in experts.adapters().items():
        W, res = getattr(original, name).flatten(1, -2), getattr(experts, name).flatten(1, -2)  # [E, out, in]
        assert not torch.allclose(res, W), name
        torch.testing.assert_close(res + lora.scaling * lora.lora_B @ lora.lora_A, W, atol=1e-6, rtol=0)
        assert torch.equal(lora.lora_A, lora.lora_A0) and torch.equal(lora.lora_B, lora.lora_B0)
        # Each expert keeps its r largest context-weighted components (ipm): its own decomposition.
        assert not torch.allclose(lora.lora_A0[0], lora.lora_A0[1])
    state = pm.plugin_state_dicts(model, config)["corda"]
    assert len(state) == 2 * 11 + 4 and f"{EXPERTS}.lora_gate_up_proj.lora_B0" in state


def test_an_expert_no_calibration_token_reaches_gets_a_plain_svd() -> None:
    def never_route_to_expert_3(model: nn.Module) -> None:
        model.layers[0].ffn.router.expert_bias[3] = -1e4  # selection only: expert 3 is never among the top k

    moe = {**MOE, "bias_update_rate": 1e-3}
    model, base, config, _ = _adapted(
        {"targets": [], "target_experts": True}, never_route_to_expert_3, moe=moe
    )
    _, covariances = corda.collect_covariances(model, CALIB)
    assert (
        covariances[f"{EXPERTS}.down_proj"][3] is None and covariances[f"{EXPERTS}.down_proj"][2] is not None
    )
    experts = model.get_submodule(EXPERTS)
    for name, lora in experts.adapters().items():
        W = getattr(base.get_submodule(EXPERTS), name).flatten(1, -2)[3]
        eye = torch.eye(W.shape[1], dtype=torch.float64)
        B0, A0 = corda.corda_factors(corda.decompose(W, eye), lora.r, "ipm", lora.scaling)
        torch.testing.assert_close(lora.lora_A0[3], A0.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(lora.lora_B0[3], B0.float(), atol=1e-6, rtol=0)
        # C = I: the adapter holds the r largest singular components of the plain weight.
        S = torch.linalg.svdvals(W.double())
        torch.testing.assert_close(torch.linalg.svdvals(lora.scaling * B0 @ A0)[: lora.r], S[: lora.r])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), **LOGITS_TOL)


def test_merge_folds_the_expert_deltas_with_the_same_logits() -> None:
    model, _, config, pm = _adapted({"target_experts": True}, moe=MOE)
    _train_adapters(model)
    with torch.no_grad():
        expected = model(IDS)
    merged = pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config)["corda"]
    assert EXPERTS in merged and not model.get_submodule(EXPERTS).adapters()
    assert not any("lora" in n for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, **LOGITS_TOL)


# --- export -------------------------------------------------------------------------------------------------------


def test_peft_export_on_the_original_base_loads_in_peft(tmp_path: Path) -> None:
    """With the LM head trained in full (corda.modules_to_save): peft loads it with the rank-2r LoRA."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from framework.interop.hf import save_pretrained

    model, base, config, pm = _adapted({"mode": "kpm", "modules_to_save": ["lm_head"]})
    assert "output.weight" in pm.trainable_names(model, config)
    _train_adapters(model)
    with torch.no_grad():
        model.output.weight.add_(
            torch.randn(model.output.weight.shape, generator=torch.Generator().manual_seed(2))
        )
    adapter, base_dir = tmp_path / "adapter", tmp_path / "base"
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=adapter, export_format="peft")
    assert files == [["adapter_model.safetensors", "adapter_config.json"]]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16.0  # rank 2r, alpha doubled: the same scale alpha/r
    assert cfg["modules_to_save"] == ["lm_head"]
    assert torch.equal(tensors["base_model.model.lm_head.weight"], model.output.weight.detach())
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    m = model.get_submodule("layers.0.attention.q_proj")
    assert torch.equal(tensors[f"{q}.lora_A.weight"][4:], m.lora_A0)
    assert torch.equal(tensors[f"{q}.lora_B.weight"][:, 4:], -m.lora_B0)
    save_pretrained(base, base_dir)
    with torch.no_grad():
        expected = model(IDS)
        hf = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        before = hf(IDS).logits
        got = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()(IDS).logits
    assert (expected - before).abs().max() > 1e-3, (
        "the adapters must have moved the model for this to test them"
    )
    torch.testing.assert_close(got, expected, **LOGITS_TOL)


def test_peft_export_of_expert_deltas_loads_in_peft_on_the_original_base(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from framework.interop.hf import save_pretrained
    from plugins.peft.low_rank import experts_from_peft

    # Every layer MoE (Mixtral's layout): attention linears plus the experts of both layers.
    model, base, config, pm = _adapted({"target_experts": True}, moe={**MOE, "every": 1})
    _train_adapters(model)
    adapter, base_dir = tmp_path / "adapter", tmp_path / "base"
    pm.hook.expertrain_export(model=model, config=config, output_dir=adapter, export_format="peft")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    # [A; A₀] and [B | −B₀] per expert, in peft's target_parameters layout (gate_up is the inner wrapper).
    lora = model.get_submodule("layers.1.ffn.experts").lora_gate_up_proj
    key = "base_model.model.model.layers.1.mlp.experts.base_layer"
    A, B = experts_from_peft(tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], 4)
    assert torch.equal(A[:, 4:], lora.lora_A0) and torch.equal(B[:, :, 4:], -lora.lora_B0)
    assert torch.equal(A[:, :4], lora.lora_A.detach()) and torch.equal(B[:, :, :4], lora.lora_B.detach())
    save_pretrained(base, base_dir)
    with torch.no_grad():
        expected = model(IDS)
        hf = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        before = hf(IDS).logits
        got = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()(IDS).logits
    assert (expected - before).abs().max() > 1e-3, (
        "the adapters must have moved the model for this to test them"
    )
    torch.testing.assert_close(got, expected, **LOGITS_TOL)


def test_corda_export_writes_adapters_initial_factors_and_saved_modules(tmp_path: Path) -> None:
    model, _, config, pm = _adapted({"modules_to_save": ["norm"]})
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="corda")
    assert files == [["corda_adapter.safetensors", "corda_config.json"]]
    tensors = load_file(str(tmp_path / "corda_adapter.safetensors"))
    assert len(tensors) == 4 * 14 + 1
    assert torch.equal(tensors["norm.weight"], model.norm.weight.detach())
    meta = json.loads((tmp_path / "corda_config.json").read_text())
    assert meta["mode"] == "ipm" and meta["r"] == 4 and meta["scaling"] == 2.0
    assert meta["modules_to_save"] == ["norm"] and meta["tied_embeddings"] is False
    m = model.get_submodule("layers.1.ffn.down_proj")
    assert torch.equal(tensors["layers.1.ffn.down_proj.lora_B0"], m.lora_B0)
    assert pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="x") == []


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (REPO / "docs" / "plugins" / "corda.md").read_text(encoding="utf-8")
    for field, typ, default, meaning in section_docs(corda.CorDAConfig):
        shown = f"`{default!r}`" if default in ("", [], {}) else f"`{default}`"
        row = f"| `corda.{field}` | {typ} | {shown} | {meaning} |"
        assert row in doc, f"docs/plugins/corda.md is stale for corda.{field}: expected the row\n{row}"
