"""The lift plugin: the principal-weight mask (top-K of the rank-k SVD approximation; smallest and no-rank-reduction
ablations), masked AdamW through the framework's optimizer (moments only for the K masked entries, weight decay
only on them), mask refresh carrying surviving moments, unmasked entries bit-identical, save/resume, merge and
export.

Tolerances: unmasked entries must be exactly unchanged (torch.equal); a resumed run must be bit-identical to an
uninterrupted one (same process, same kernels); the step-0 output equals the base exactly (the effective weight is
the base weight with its own values written back).
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
from plugins.peft import lift

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


def _job(
    parallel: dict[str, Any] | None = None, world: int = 1, **section: Any
) -> tuple[Transformer, JobConfig, PluginManager, lift.LIFTPlugin]:
    plugin = lift.LIFTPlugin()
    pm = PluginManager(default_registry())
    pm.register_object("lift", plugin)
    raw = {
        "plugins": ["lift"],
        "model": MODEL,
        "moe": {"num_experts": 0},
        "data": {"seq_len": 16},
        "optim": {"weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0},
        "parallel": parallel or {},
        "lift": {"r": 2, "filter_rank": 4, "update_interval": 2, **section},
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=world)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model, config, pm, plugin


def _optimizer(model: Transformer, config: JobConfig, pm: PluginManager) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, config.optim, pm.param_groups(model, config), torch.device("cpu"))
    pm.hook.expertrain_after_optimizer(model=model, optimizer=optimizer, config=config)
    return optimizer


def _steps(
    model: Transformer, config: JobConfig, pm: PluginManager, opt: torch.optim.Optimizer, steps: range
) -> None:
    """The trainer's step sequence (step_begin refreshes masks) with the real AdamW."""
    for step in steps:
        pm.hook.expertrain_step_begin(step=step, model=model, optimizer=opt, config=config)
        logits = model(IDS)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
        pm.hook.expertrain_after_backward(step=step, model=model, config=config)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_mask_is_top_k_of_the_low_rank_approximation_with_ablations() -> None:
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
    K = lift.budget(12, 10, 1)
    assert K == 22 and lift.budget(4, 4, 8) == 16  # capped at the whole matrix
    U, S, Vh = torch.linalg.svd(w)
    approx = (U[:, :3] * S[:3]) @ Vh[:3]
    idx = lift.principal_mask(w, K, 3)
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == K
    score = approx.abs().flatten()
    # every chosen entry scores at least as high as every other (fp32 SVD: 1e-5 slack for round-off of near-ties)
    others = torch.ones(120, dtype=torch.bool)
    others[idx] = False
    assert score[idx].min() >= score[others].max() - 1e-5
    small = lift.principal_mask(w, K, 3, "smallest")
    assert score[small].max() <= score[~torch.isin(torch.arange(120), small)].min() + 1e-5
    magnitude = lift.principal_mask(w, K, 0)
    assert torch.equal(magnitude, torch.topk(w.abs().flatten(), K).indices.sort().values)
    assert not torch.equal(magnitude, idx)  # rank reduction changes the choice


def test_only_masked_entries_train_with_sparse_moments_and_refresh_carries_them() -> None:
    model, config, pm, plugin = _job()
    modules = lift.lift_modules(model)
    assert len(modules) == 14  # q/k/v/o + gate/up/down of 2 layers
    m = dict(modules)["layers.0.attention.q_proj"]
    assert m.budget == (32 + 32) * 2 < 32 * 32 // 4  # K well below m·n
    base = {p: mod.weight.detach().clone() for p, mod in modules}
    with torch.no_grad():
        assert torch.equal(m.effective_weight(), m.weight)  # step 0: the base model exactly
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        lift.value_parameter_names(model)
    )
    opt = _optimizer(model, config, pm)
    group = next(g for g in opt.param_groups if g.get("group_name") == lift.GROUP)
    assert group["weight_decay"] == 0.1
    _steps(model, config, pm, opt, range(1, 2))
    # Optimizer state exists for the values only, and its moments are [K], never [m, n].
    assert set(opt.state) == {mod.lift_values for _, mod in modules}
    assert all(
        s["exp_avg"].shape == (mod.budget,) for (_, mod) in modules for s in [opt.state[mod.lift_values]]
    )
    masks_before = {p: mod.lift_index.clone() for p, mod in modules}
    _steps(
        model, config, pm, opt, range(2, 4)
    )  # step 2 refreshes the masks (update_interval=2 -> before step 3)
    assert plugin.kept is not None and 0 < plugin.kept < 1
    changed_any = False
    for p, mod in modules:
        ever_masked = torch.zeros(mod.weight.numel(), dtype=torch.bool)
        ever_masked[masks_before[p]] = True
        ever_masked[mod.lift_index] = True
        with torch.no_grad():
            w = mod.effective_weight().flatten()
        assert torch.equal(w[~ever_masked], base[p].flatten()[~ever_masked]), p  # bit-identical outside masks
        changed_any |= not torch.equal(w[ever_masked], base[p].flatten()[ever_masked])
        assert opt.state[mod.lift_values]["step"] == 3  # not reset by the refresh
    assert changed_any


def test_refresh_keeps_moments_of_surviving_entries_and_zeroes_new_ones() -> None:
    model, config, pm, _ = _job(update_interval=0)
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 3))
    _, m = lift.lift_modules(model)[0]
    old_idx, state = m.lift_index.clone(), opt.state[m.lift_values]
    old = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    with torch.no_grad():  # move the weights so that the new mask differs
        m.lift_values.mul_(0.0)
    m.refresh(4, "largest", opt)
    new_idx = m.lift_index
    kept = torch.isin(new_idx, old_idx)
    assert kept.any() and (~kept).any()
    for key, before in old.items():
        after = state[key]
        pos = torch.searchsorted(old_idx, new_idx[kept])
        assert torch.equal(after[kept], before[pos])
        assert torch.count_nonzero(after[~kept]) == 0
    # values read from the weight, which holds the trained (zeroed) entries of the old mask
    assert torch.equal(m.lift_values.detach(), m.weight.detach().flatten()[new_idx])


def test_resume_from_model_and_optimizer_state_is_bit_identical() -> None:
    model, config, pm, _ = _job()
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 3))
    saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    saved_opt = {
        "state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved_opt["state"].items()},
        "param_groups": saved_opt["param_groups"],
    }
    _steps(model, config, pm, opt, range(3, 6))
    again, config2, pm2, _ = _job()
    again.init_weights(7)  # other weights: everything must come from the checkpoint (mask buffers included)
    again.load_state_dict(saved_model)
    opt2 = _optimizer(again, config2, pm2)
    opt2.load_state_dict(saved_opt)
    _steps(again, config2, pm2, opt2, range(3, 6))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_merge_and_export(tmp_path: Path) -> None:
    model, config, pm, _ = _job()
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 4))
    with torch.no_grad():
        expected = model(IDS)
    files = pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="lift")
    assert ["lift_model.safetensors", "lift_config.json"] in files
    tensors = load_file(str(tmp_path / "lift_model.safetensors"))
    q = dict(lift.lift_modules(model))["layers.1.attention.q_proj"]
    rows, cols = tensors["model.layers.1.self_attn.q_proj.lift_indices"]
    torch.testing.assert_close(
        q.effective_weight()[rows, cols], tensors["model.layers.1.self_attn.q_proj.lift_values"]
    )
    meta = json.loads((tmp_path / "lift_config.json").read_text())
    assert meta["method"] == "LIFT" and meta["modules"]["model.layers.1.self_attn.q_proj"]["K"] == q.budget
    merged = pm.hook.expertrain_merge_adapters(model=model, config=config)
    assert len(merged[0]) == 14 and not lift.lift_modules(model)
    assert all(not n.endswith("lift_values") for n in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)  # same weights, same kernel


@pytest.mark.parametrize(
    ("section", "parallel", "key"),
    [
        ({"target_experts": True}, {}, "lift.target_experts"),
        ({}, {"tp": 2}, "parallel.tp"),
        ({}, {"ep": 2}, "parallel.ep"),
    ],
)
def test_unsupported_layouts_are_refused(section: dict[str, Any], parallel: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*lift"):
        _job(parallel=parallel, world=2, **section)
