"""The soka plugin: the Van Loan–Pitsianis rearrangement (a Kronecker sum becomes a rank-r matrix exactly; not a plain
reshape), the KPSVD Frobenius identity, rank choice (energy, elbow, cap), the forward without ΔW, the PiSSA-style
residual (output unchanged at step 0), zero padding rows that never move, merge and export; the tensor-parallel
factorisation and the local-shard forward (what one rank computes from its shards against the whole product); routed
experts (per-expert KPSVD and ranks, step 0, training, merge and export). The sharded runs themselves are in
tests/distributed/test_soka_parallel.py.

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
from framework.models.init import KeyedInit
from framework.models.moe.experts import GroupedExperts
from framework.train.optim import build_optimizer
from plugins.peft import soka
from tests.unit.plugins.tiny_jobs import MODEL

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
G = torch.Generator().manual_seed(3)


def _job(
    parallel: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    moe: dict[str, Any] | None = None,
    **section: Any,
) -> tuple[Transformer, JobConfig, PluginManager]:
    pm = PluginManager(default_registry())
    pm.load(["soka"])
    raw = {
        "plugins": ["soka"],
        "model": {**MODEL, **(model or {})},
        "moe": moe or {"num_experts": 0},
        "data": {"seq_len": 16},
        "optim": {"weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0},
        "parallel": parallel or {},
        "soka": section,
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=2 if parallel else 1)
    net = Transformer(config.model, config.moe, pm.registry)
    net.init_weights(0)
    return net, config, pm


def _transform(model: Transformer, config: JobConfig, pm: PluginManager) -> None:
    """The assembly's order on a whole model: structure (transform), then the decomposition (init hook)."""
    pm.hook.expertrain_transform_model(model=model, config=config)
    pm.hook.expertrain_init_weights(
        model=model, config=config, init=KeyedInit.for_model(0, model), resumed=False
    )
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
    """With the LM head trained in full (soka.modules_to_save): in the export and in the merged model."""
    model, config, pm = _job(max_rank=3, modules_to_save=["lm_head"])
    _transform(model, config, pm)
    assert "output.weight" in pm.trainable_names(model, config)
    with torch.no_grad():
        for _, m in soka.soka_modules(model):
            m.soka_B[: m.rank].add_(0.01)
        model.output.weight.mul_(1.5)  # as training the head would move it
        trained_head = model.output.weight.detach().clone()
        expected = model(IDS)
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="soka")
    assert ["soka_model.safetensors", "soka_config.json"] in files
    tensors = load_file(str(tmp_path / "soka_model.safetensors"))
    meta = json.loads((tmp_path / "soka_config.json").read_text())
    q = dict(soka.soka_modules(model))["layers.0.attention.q_proj"]
    hf = "model.layers.0.self_attn.q_proj"
    assert meta["modules"][hf] == {"out": [4, 8], "in": [4, 8], "r": q.rank}
    assert meta["modules_to_save"] == ["lm_head"] and torch.equal(tensors["lm_head.weight"], trained_head)
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
    assert torch.equal(model.output.weight, trained_head)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)


MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "every": 2}


def test_kron_factors_follow_the_tensor_parallel_split() -> None:
    for n in (1, 13, 18, 48, 64, 4096, 11008):
        assert soka.kron_factors(n) == soka.near_sqrt_factors(n)
    assert soka.kron_factors(18, 2) == (6, 3)  # default (3, 6): m1 = 3 cannot be split in two
    assert soka.kron_factors(48, 4) == (8, 6)  # the most balanced pair with 4 | a
    assert soka.kron_factors(11008, 4) == (128, 86)  # default (86, 128)
    with pytest.raises(ValueError, match="multiple of 4"):
        soka.kron_factors(18, 4)


def test_local_shard_forward_equals_the_full_forward() -> None:
    """What a tensor-parallel rank computes from its shards (SoKALinear's DTensor path runs kron_apply on the local
    parts): column-parallel, rows i1 ∈ block t of A give output rows t of the full result; row-parallel, columns
    j1 ∈ block t of A with the input's column block t give partial sums adding up to the full result."""
    A = torch.randn(3, 4, 6, generator=G)
    B = torch.randn(3, 5, 2, generator=G)
    x = torch.randn(2, 7, 12, generator=G)
    full = soka.kron_apply(A, B, x)
    tp = 2
    cols = [soka.kron_apply(a, B, x) for a in A.chunk(tp, dim=1)]  # soka_A Shard(1), soka_B replicated
    torch.testing.assert_close(torch.cat(cols, dim=-1), full, rtol=1e-5, atol=1e-5)  # fp32 (BLAS blocking)
    parts = [
        soka.kron_apply(a, B, xs) for a, xs in zip(A.chunk(tp, dim=2), x.chunk(tp, dim=-1), strict=True)
    ]  # soka_A Shard(2), x Shard(-1): a partial sum per rank
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    placements = soka.SoKALinear.tensor_parallel_placements
    assert placements("colwise")["soka_A"].dim == 1 and placements("rowwise")["soka_A"].dim == 2
    assert placements("colwise")["soka_B"].is_replicate() and placements("rowwise")["soka_B"].is_replicate()


def test_tensor_parallel_factorisation_splits_the_sharded_index() -> None:
    """ffn_hidden=18 (default 3x6): the column-parallel gate/up get m1 = 6, the row-parallel down n1 = 6; the
    output is still unchanged at step 0."""
    model, config, pm = _job(parallel={"tp": 2}, model={"ffn_hidden": 18}, max_rank=4)
    with torch.no_grad():
        expected = model(IDS)
    _transform(model, config, pm)
    modules = dict(soka.soka_modules(model))
    gate, down = modules["layers.0.ffn.gate_proj"], modules["layers.0.ffn.down_proj"]
    assert (gate.m1, gate.m2) == (6, 3) and (down.n1, down.n2) == (6, 3)
    for path, m in modules.items():
        style = soka.tensor_parallel_style(path)
        assert (m.m1 if style == "colwise" else m.n1) % 2 == 0, path
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"soka\.targets.*parallel\.tp=1"):
        soka.tensor_parallel_multiples("layers.0.attention.extra", torch.nn.Linear(4, 4), 2)


def test_expert_factors_frobenius_identity_per_expert() -> None:
    W = torch.randn(3, 12, 20, generator=G, dtype=torch.float64)
    A, B, sigma = soka.kpsvd(W, 3, 4)
    assert A.shape == (3, 12, 3, 4) and B.shape == (3, 12, 4, 5) and sigma.shape == (3, 12)
    torch.testing.assert_close(soka.kron_sum(A, B), W, rtol=1e-10, atol=1e-10)
    for e in range(3):
        torch.testing.assert_close(sigma[e], soka.kpsvd(W[e], 3, 4)[2], rtol=1e-10, atol=1e-12)
        for r in (1, 5):
            err = (W[e] - soka.kron_sum(A[e, :r], B[e, :r])).pow(2).sum()
            torch.testing.assert_close(err, sigma[e, r:].pow(2).sum(), rtol=1e-10, atol=1e-12)
    # Each expert's rank from its own spectrum: a rank-1 and a rank-3 Kronecker sum (plus tiny noise).
    a, b = torch.randn(2, 3, 3, 4, generator=G).double(), torch.randn(2, 3, 4, 5, generator=G).double()
    a[0, 1:] = 0.0
    noise = 1e-6 * torch.randn(2, 12, 20, generator=G).double()
    P, Q, ranks = soka.principal_terms(soka.kron_sum(a, b) + noise, 3, 4, 0.999, 8, use_elbow=False)
    assert ranks.tolist() == [1, 3] and P.shape == (2, 8, 3, 4)
    assert torch.count_nonzero(P[0, 1:]) == 0 and torch.count_nonzero(Q[1, 3:]) == 0


def test_experts_output_unchanged_at_step_zero_and_only_factors_train() -> None:
    model, config, pm = _job(moe=MOE, target_experts=True, max_rank=3)
    with torch.no_grad():
        expected = model(IDS)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    _transform(model, config, pm)
    [(path, experts)] = soka.soka_expert_modules(model)
    assert path == "layers.0.ffn.experts" and isinstance(experts, soka.SoKAExperts)
    gate_up, down = experts.soka_gate_up_proj, experts.soka_down_proj
    assert (gate_up.m1, gate_up.m2, gate_up.n1, gate_up.n2) == (6, 8, 4, 8)  # [2I, H] = [48, 32]
    assert (down.m1, down.m2, down.n1, down.n2) == (4, 8, 4, 6)  # [H, I] = [32, 24]
    assert gate_up.soka_A.shape == (4, 3, 6, 4) and down.soka_rank.shape == (4,)
    # Residual + factors rebuild every expert's original weight (fp32 roundings of order 1e-7).
    rebuilt = experts.merged_weights()
    for name in soka.EXPERT_WEIGHTS:
        torch.testing.assert_close(rebuilt[name], original[f"{path}.{name}"], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)
    names = soka.factor_parameter_names(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert f"{path}.soka_down_proj.soka_B" in names
    assert experts.trained_numel() == sum(down.ranks) * (4 * 4 + 8 * 6) + sum(gate_up.ranks) * (6 * 4 + 8 * 8)
    assert set(experts.per_expert_parameters()) >= {f"soka_{w}.soka_rank" for w in soka.EXPERT_WEIGHTS}
    optimizer = build_optimizer(model, config.optim, pm.param_groups(model, config), torch.device("cpu"))
    residuals = {n: getattr(experts, n).detach().clone() for n in soka.EXPERT_WEIGHTS}
    start = {n: f.soka_A.detach().clone() for n, f in experts.factors().items()}
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(IDS)[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, f in experts.factors().items():
        assert torch.equal(getattr(experts, name), residuals[name])
        assert not torch.equal(f.soka_A, start[name])
        for e, r in enumerate(f.ranks):
            assert torch.count_nonzero(f.soka_A[e, r:]) == 0 and torch.count_nonzero(f.soka_B[e, r:]) == 0


def test_experts_merge_and_export(tmp_path: Path) -> None:
    model, config, pm = _job(moe=MOE, target_experts=True, targets=["q_proj"], max_rank=3)
    _transform(model, config, pm)
    [(path, experts)] = soka.soka_expert_modules(model)
    original = {n: getattr(experts, n).detach().clone() for n in soka.EXPERT_WEIGHTS}
    for name, f in experts.factors().items():
        original[name] += soka.kron_sum(f.soka_A0, f.soka_B0).reshape(original[name].shape)
    with torch.no_grad():
        for f in experts.factors().values():
            f.soka_B.add_(0.01 * (f.soka_B != 0))  # move the rows in use only
        expected = model(IDS)
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="soka")
    assert ["soka_model.safetensors", "soka_config.json"] in files
    tensors = load_file(str(tmp_path / "soka_model.safetensors"))
    meta = json.loads((tmp_path / "soka_config.json").read_text())
    merged = experts.merged_weights()
    for name, f in experts.factors().items():
        hf = f"model.layers.0.mlp.experts.{name}"
        assert meta["modules"][hf] == {
            "out": [f.m1, f.m2],
            "in": [f.n1, f.n2],
            "r": f.ranks,
            "experts": 4,
        }
        assert tensors[f"{hf}.soka_A"].shape == (4, max(f.ranks), f.m1, f.n1)
        assert tensors[f"{hf}.soka_rank"].tolist() == f.ranks
        applied = original[name].flatten(1, -2) + (
            soka.kron_sum(tensors[f"{hf}.soka_A"], tensors[f"{hf}.soka_B"])
            - soka.kron_sum(tensors[f"{hf}.soka_A0"], tensors[f"{hf}.soka_B0"])
        )
        torch.testing.assert_close(applied, merged[name].flatten(1, -2), rtol=0, atol=1e-5)
    assert "model.layers.0.self_attn.q_proj" in meta["modules"]
    result = pm.hook.expertrain_merge_adapters(model=model, config=config)
    assert result[0] == ["layers.0.attention.q_proj", "layers.1.attention.q_proj", path]
    assert type(model.get_submodule(path)) is GroupedExperts
    assert not any("soka" in n for n in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)


def test_empty_targets_need_target_experts() -> None:
    with pytest.raises(ConfigError, match=r"soka\.targets"):
        _job(targets=[])
    model, config, pm = _job(moe=MOE, targets=[], target_experts=True)
    _transform(model, config, pm)
    assert not soka.soka_modules(model) and len(soka.soka_expert_modules(model)) == 1


def test_a_tied_lm_head_is_refused() -> None:
    model, config, pm = _job(model={"tie_embeddings": True}, targets="output")
    with pytest.raises(ConfigError, match=r"soka\.targets.*tie_embeddings"):
        _transform(model, config, pm)
