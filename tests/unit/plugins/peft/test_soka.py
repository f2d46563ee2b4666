"""The soka plugin: the Van Loan–Pitsianis rearrangement (a Kronecker sum becomes a rank-r matrix exactly; not a plain
reshape), the KPSVD Frobenius identity, rank choice (energy, elbow, cap), the forward without ΔW, the PiSSA-style
residual (output unchanged at step 0), zero padding rows that never move, merge and export.

Tolerances: the KPSVD runs in fp64, so its identities hold to 1e-10 relative; the adapted layers are fp32, so the
step-0 output matches the base to 1e-5 absolute on logits of order 1 (residual and factors are each rounded to fp32
once: measured ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from framework.config import ConfigError, JobConfig, resolve
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from framework.train.optim import build_optimizer
from plugins.peft import soka

MODEL = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden": 48,
    "max_seq_len": 16,
    "vocab_size": 64,
}
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
G = torch.Generator().manual_seed(3)


def _job(
    parallel: dict[str, Any] | None = None, **section: Any
) -> tuple[Transformer, JobConfig, PluginManager]:
    pm = PluginManager(default_registry())
    pm.load(["soka"])
    raw = {
        "plugins": ["soka"],
        "model": MODEL,
        "moe": {"num_experts": 0},
        "data": {"seq_len": 16},
        "optim": {"weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0},
        "parallel": parallel or {},
        "soka": section,
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=2 if parallel else 1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    return model, config, pm


def _transform(model: Transformer, config: JobConfig, pm: PluginManager) -> None:
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def test_rearrangement_turns_a_kronecker_sum_into_a_rank_r_matrix() -> None:
    A = torch.randn(3, 4, 6, generator=G, dtype=torch.float64)
    B = torch.randn(3, 5, 2, generator=G, dtype=torch.float64)
    W = soka.kron_sum(A, B)
    torch.testing.assert_close(W, sum(torch.kron(A[k], B[k]) for k in range(3)), rtol=1e-12, atol=1e-12)
    R = soka.rearrange(W, 4, 6)
    assert R.shape == (24, 10)
    torch.testing.assert_close(R, A.flatten(1).T @ B.flatten(1), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(R) == 3
    assert torch.linalg.matrix_rank(W.reshape(24, 10)) > 3  # a plain reshape is not R(W)


def test_kpsvd_frobenius_identity() -> None:
    W = torch.randn(12, 20, generator=G, dtype=torch.float64)
    A, B, sigma = soka.kpsvd(W, 3, 4)
    assert A.shape == (12, 3, 4) and B.shape == (12, 4, 5) and sigma.shape == (12,)
    torch.testing.assert_close(soka.kron_sum(A, B), W, rtol=1e-10, atol=1e-10)  # all terms: exact
    for r in (1, 4, 9):
        err = (W - soka.kron_sum(A[:r], B[:r])).pow(2).sum()
        torch.testing.assert_close(err, sigma[r:].pow(2).sum(), rtol=1e-10, atol=1e-12)


def test_rank_choice_energy_elbow_and_cap() -> None:
    sigma = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7])
    # energies 100, 81, 64, 1, ... of 247.94: cumulative fractions 0.403, 0.730, 0.988, 0.992, ...
    assert soka.energy_rank(sigma, 0.4) == 1 and soka.energy_rank(sigma, 0.98) == 3
    assert soka.energy_rank(sigma, 0.99) == 4
    assert soka.energy_rank(sigma, 1.0) == 7
    assert soka.elbow_rank(sigma) == 3  # the bend after the three large values
    assert soka.elbow_rank(torch.tensor([10.0, 1.0, 0.9, 0.8])) == 1
    assert soka.choose_rank(sigma, 1.0, 8) == 3  # elbow below energy
    assert soka.choose_rank(sigma, 1.0, 8, use_elbow=False) == 7
    assert soka.choose_rank(sigma, 1.0, 2) == 2  # cap
    assert soka.near_sqrt_factors(48) == (6, 8) and soka.near_sqrt_factors(13) == (1, 13)


def test_forward_without_delta_matches_the_kronecker_matrix() -> None:
    A = torch.randn(2, 4, 8, generator=G)
    B = torch.randn(2, 8, 4, generator=G)
    x = torch.randn(3, 5, 32, generator=G)
    # fp32 products of length 32: 1e-5 relative
    torch.testing.assert_close(soka.kron_apply(A, B, x), x @ soka.kron_sum(A, B).T, rtol=1e-5, atol=1e-5)


def test_output_unchanged_at_step_zero_and_only_factors_train() -> None:
    model, config, pm = _job(energy=0.9, max_rank=4)
    with torch.no_grad():
        expected = model(IDS)
    _transform(model, config, pm)
    modules = soka.soka_modules(model)
    assert len(modules) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)
    q = dict(modules)["layers.0.attention.q_proj"]
    assert (q.m1, q.m2, q.n1, q.n2) == (4, 8, 4, 8) and 1 <= q.rank <= 4 and q.soka_A.shape[0] == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        soka.factor_parameter_names(model)
    )
    optimizer = build_optimizer(model, config.optim, pm.param_groups(model, config), torch.device("cpu"))
    residuals = {p: m.weight.detach().clone() for p, m in modules}
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(IDS)[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert set(optimizer.state) == {
        t for _, m in modules for t in (m.soka_A, m.soka_B)
    }  # no state for the base
    for p, m in modules:
        assert torch.equal(m.weight, residuals[p])
        assert torch.count_nonzero(m.soka_A[m.rank :]) == 0 and torch.count_nonzero(m.soka_B[m.rank :]) == 0
    assert any(not torch.equal(m.soka_A, m.soka_A0) for _, m in modules)


def test_merge_and_export(tmp_path: Path) -> None:
    model, config, pm = _job(max_rank=3)
    _transform(model, config, pm)
    with torch.no_grad():
        for _, m in soka.soka_modules(model):
            m.soka_B[: m.rank].add_(0.01)
        expected = model(IDS)
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="soka")
    assert ["soka_model.safetensors", "soka_config.json"] in files
    tensors = load_file(str(tmp_path / "soka_model.safetensors"))
    meta = json.loads((tmp_path / "soka_config.json").read_text())
    q = dict(soka.soka_modules(model))["layers.0.attention.q_proj"]
    hf = "model.layers.0.self_attn.q_proj"
    assert meta["modules"][hf] == {"out": [4, 8], "in": [4, 8], "r": q.rank}
    assert tensors[f"{hf}.soka_A"].shape == (q.rank, 4, 4)
    original = q.weight.detach() + soka.kron_sum(q.soka_A0, q.soka_B0)
    applied = (
        original
        + soka.kron_sum(tensors[f"{hf}.soka_A"], tensors[f"{hf}.soka_B"])
        - soka.kron_sum(tensors[f"{hf}.soka_A0"], tensors[f"{hf}.soka_B0"])
    )
    torch.testing.assert_close(applied, q.merged_weight(), rtol=0, atol=1e-5)  # fp32 sums of kron terms
    merged = pm.hook.expertrain_merge_adapters(model=model, config=config)
    assert len(merged[0]) == 14 and not any("soka" in n for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("section", "parallel", "key"),
    [({"target_experts": True}, None, "soka.target_experts"), ({}, {"tp": 2}, "parallel.tp")],
)
def test_unsupported_layouts_are_refused(
    section: dict[str, Any], parallel: dict[str, Any] | None, key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*soka"):
        _job(parallel=parallel, **section)
