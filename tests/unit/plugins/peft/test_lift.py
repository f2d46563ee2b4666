"""The lift plugin: the principal-weight mask (top-K of the rank-k SVD approximation; smallest and no-rank-reduction
ablations), masked AdamW through the framework's optimizer (moments only for the K masked entries, weight decay
only on them), mask refresh carrying surviving moments, unmasked entries bit-identical, save/resume, merge and
export; routed experts (a budget, an SVD and a mask per expert and fused weight, refreshed per expert; export layout
and merge); the split of a mask over tensor-parallel shards; which settings are refused.

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
from framework.models.init import KeyedInit
from framework.models.moe.experts import GroupedExperts
from framework.train.optim import build_optimizer
from plugins.peft import lift
from tests.unit.plugins.tiny_jobs import MODEL

IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _job(
    parallel: dict[str, Any] | None = None,
    world: int = 1,
    moe: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    **section: Any,
) -> tuple[Transformer, JobConfig, PluginManager, lift.LIFTPlugin]:
    plugin = lift.LIFTPlugin()
    pm = PluginManager(default_registry())
    pm.register_object("lift", plugin)
    raw = {
        "plugins": ["lift"],
        "model": MODEL,
        "moe": moe or {"num_experts": 0},
        "data": {"seq_len": 16},
        "optim": {"weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0},
        "parallel": parallel or {},
        "train": train or {},
        "lift": {"r": 2, "filter_rank": 4, "update_interval": 2, **section},
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=world)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)  # structure
    pm.hook.expertrain_init_weights(
        model=model, config=config, init=KeyedInit.for_model(0, model), resumed=False
    )  # masks
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
    """With the final norm and the head trained in full (lift.modules_to_save), resumed with the masks."""
    saved = ["norm", "lm_head"]
    model, config, pm, _ = _job(modules_to_save=saved)
    norm_before = model.norm.weight.detach().clone()
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 3))
    assert not torch.equal(model.norm.weight, norm_before), "the saved norm must train"
    saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    saved_opt = {
        "state": {k: {n: t.clone() for n, t in s.items()} for k, s in saved_opt["state"].items()},
        "param_groups": saved_opt["param_groups"],
    }
    _steps(model, config, pm, opt, range(3, 6))
    again, config2, pm2, _ = _job(modules_to_save=saved)
    again.init_weights(7)  # other weights: everything must come from the checkpoint (mask buffers included)
    again.load_state_dict(saved_model)
    opt2 = _optimizer(again, config2, pm2)
    opt2.load_state_dict(saved_opt)
    _steps(again, config2, pm2, opt2, range(3, 6))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_merge_and_export(tmp_path: Path) -> None:
    """With the LM head trained in full (lift.modules_to_save): in the export and in the merged model."""
    model, config, pm, _ = _job(modules_to_save=["lm_head"])
    base_head = model.output.weight.detach().clone()
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 4))
    trained_head = model.output.weight.detach().clone()
    assert not torch.equal(trained_head, base_head)
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
    assert meta["modules_to_save"] == ["lm_head"] and torch.equal(tensors["lm_head.weight"], trained_head)
    merged = pm.hook.expertrain_merge_adapters(model=model, config=config)
    assert len(merged[0]) == 14 and not lift.lift_modules(model)
    assert all(not n.endswith("lift_values") for n in model.state_dict())
    assert torch.equal(model.output.weight, trained_head)
    with torch.no_grad():
        assert torch.equal(model(IDS), expected)  # same weights, same kernel


@pytest.mark.parametrize(
    ("section", "train", "key"),
    [
        ({"targets": []}, {}, "lift.targets"),
        ({}, {"engine": "deepspeed"}, "train.engine"),
    ],
)
def test_unsupported_settings_are_refused(section: dict[str, Any], train: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _job(world=2, train=train, **section)


# --- routed experts -----------------------------------------------------------------------------------------------

MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "every": 2}  # layer 0 MoE, layer 1 dense
E, H, HID = 4, 32, 16  # experts, model dim, expert hidden


def _experts(model: Transformer) -> lift.LIFTExperts:
    (path, experts), *rest = [(p, m) for p, m in lift.lift_modules(model) if isinstance(m, lift.LIFTExperts)]
    assert not rest and path == "layers.0.ffn.experts"
    return experts


def test_every_expert_weight_has_its_own_budget_and_mask_from_its_own_svd() -> None:
    model, _, _, _ = _job(moe=MOE, target_experts=True, targets=["q_proj"])
    experts = _experts(model)
    gate_up, down = experts.lift_gate_up_proj, experts.lift_down_proj
    assert gate_up.lift_index.shape == (E, lift.budget(2 * HID, H, 2)) == (E, (2 * HID + H) * 2)
    assert down.lift_index.shape == (E, lift.budget(H, HID, 2)) == (E, (H + HID) * 2)
    assert gate_up.lift_values.shape == gate_up.lift_index.shape and gate_up.lift_values.requires_grad
    w_gate_up = experts.gate_up_proj.detach().reshape(E, 2 * HID, H)
    w_down = experts.down_proj.detach()
    for e in range(E):  # each expert's matrix alone (unbatched SVD): the same mask as the batched draw
        assert torch.equal(gate_up.lift_index[e], lift.principal_mask(w_gate_up[e], gate_up.budget, 4))
        assert torch.equal(down.lift_index[e], lift.principal_mask(w_down[e], down.budget, 4))
        assert torch.equal(gate_up.lift_values[e], w_gate_up[e].flatten()[gate_up.lift_index[e]])
    assert not torch.equal(gate_up.lift_index[0], gate_up.lift_index[1])  # per expert, not one shared mask
    names = lift.value_parameter_names(model)
    assert "layers.0.ffn.experts.lift_gate_up_proj.lift_values" in names
    assert "layers.0.ffn.experts.lift_down_proj.lift_values" in names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert experts.per_expert_parameters() == [
        "lift_gate_up_proj.lift_index",
        "lift_gate_up_proj.lift_values",
        "lift_down_proj.lift_index",
        "lift_down_proj.lift_values",
    ]
    with torch.no_grad():  # step 0: the base weights exactly
        assert torch.equal(experts.effective_weight("gate_up_proj"), experts.gate_up_proj)
        assert torch.equal(experts.effective_weight("down_proj"), experts.down_proj)


def test_only_masked_expert_entries_train_and_refresh_is_per_expert() -> None:
    model, config, pm, plugin = _job(moe=MOE, target_experts=True, targets=[])
    experts = _experts(model)
    masks = experts.masks()
    base = {n: getattr(experts, n).detach().clone().reshape(E, -1) for n in masks}
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 2))
    assert set(opt.state) == {m.lift_values for m in masks.values()}
    for m in masks.values():  # moments [E, K]: never the size of the weights
        assert opt.state[m.lift_values]["exp_avg"].shape == (E, m.budget)
    before = {n: m.lift_index.clone() for n, m in masks.items()}
    _steps(model, config, pm, opt, range(2, 4))  # new masks before step 3
    assert plugin.kept is not None and 0 < plugin.kept < 1
    for name, m in masks.items():
        assert not torch.equal(m.lift_index, before[name]), name
        with torch.no_grad():
            w = experts.effective_weight(name).reshape(E, -1)
        for e in range(E):
            ever = torch.zeros(w.shape[1], dtype=torch.bool)
            ever[before[name][e]] = True
            ever[m.lift_index[e]] = True
            assert torch.equal(w[e][~ever], base[name][e][~ever]), (name, e)  # bit-identical outside
            assert not torch.equal(w[e][ever], base[name][e][ever]), (name, e)  # every expert trained
            # each expert's budget stays its own: K distinct sorted entries
            assert torch.equal(m.lift_index[e], m.lift_index[e].unique())
        assert opt.state[m.lift_values]["step"] == 3


def test_expert_refresh_keeps_moments_of_surviving_entries_and_zeroes_new_ones() -> None:
    model, config, pm, _ = _job(moe=MOE, target_experts=True, targets=[], update_interval=0)
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 3))
    experts = _experts(model)
    m = experts.lift_down_proj
    old_idx, state = m.lift_index.clone(), opt.state[m.lift_values]
    old = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    with torch.no_grad():  # expert 1's trained entries go to 0: its mask must move; the others' weights stay
        m.lift_values[1].zero_()
    experts.refresh(4, "largest", opt)
    new_idx = m.lift_index
    assert not torch.equal(new_idx[1], old_idx[1])
    for e in range(E):
        kept = torch.isin(new_idx[e], old_idx[e])
        pos = torch.searchsorted(old_idx[e], new_idx[e][kept])
        for key, before in old.items():
            assert torch.equal(state[key][e][kept], before[e][pos]), (e, key)
            assert torch.count_nonzero(state[key][e][~kept]) == 0
    assert (~torch.isin(new_idx[1], old_idx[1])).any()
    assert torch.equal(m.lift_values.detach(), experts.down_proj.detach().reshape(E, -1).gather(1, new_idx))


def test_expert_merge_and_export(tmp_path: Path) -> None:
    model, config, pm, _ = _job(moe=MOE, target_experts=True, targets=["o_proj"])
    opt = _optimizer(model, config, pm)
    _steps(model, config, pm, opt, range(1, 4))
    model.eval()
    with torch.no_grad():
        expected = model(IDS)
        trained = {n: _experts(model).effective_weight(n).clone() for n in lift.EXPERT_WEIGHTS}
    pm.hook.expertrain_export(model=model, config=config, output_dir=tmp_path, export_format="lift")
    tensors = load_file(str(tmp_path / "lift_model.safetensors"))
    meta = json.loads((tmp_path / "lift_config.json").read_text())
    hf = "model.layers.0.mlp.experts"
    shapes = {"gate_up_proj": (E, 2 * HID, H), "down_proj": (E, H, HID)}
    for name, shape in shapes.items():
        idx, values = tensors[f"{hf}.{name}.lift_indices"], tensors[f"{hf}.{name}.lift_values"]
        K = lift.budget(shape[1], shape[2], 2)
        assert idx.shape == (E, 2, K) and values.shape == (E, K)
        assert meta["modules"][f"{hf}.{name}"] == {"shape": list(shape), "experts": E, "K": K}
        # Applied to the base weight in transformers' layout, the export gives the trained experts.
        w = trained[name].reshape(shape)
        for e in range(E):
            torch.testing.assert_close(w[e, idx[e, 0], idx[e, 1]], values[e], rtol=0, atol=0)
    merged = pm.hook.expertrain_merge_adapters(model=model, config=config)
    assert "layers.0.ffn.experts" in merged[0]
    experts = model.get_submodule("layers.0.ffn.experts")
    assert type(experts) is GroupedExperts
    assert not any("lift_" in n for n in model.state_dict())
    with torch.no_grad():
        assert torch.equal(experts.gate_up_proj, trained["gate_up_proj"])
        assert torch.equal(model(IDS), expected)  # same weights, same kernel


def test_local_positions_split_the_mask_over_shards_exactly() -> None:
    """What each tensor- / expert-tensor-parallel rank writes: the blocks of every split, assembled, give the whole
    effective weight (colwise rows, rowwise columns, an expert weight's hidden slice [E, 2, I, H] -> dim 2)."""
    g = torch.Generator().manual_seed(3)
    for shape, dim, parts in (((8, 6), 0, 2), ((8, 6), 1, 3), ((2, 4, 6), 1, 2)):
        numel = torch.Size(shape).numel()
        w = torch.randn(shape, generator=g)
        index = torch.randperm(numel, generator=g)[: numel // 3].sort().values
        values = torch.randn(index.numel(), generator=g)
        expected = w.flatten().index_put((index,), values).view(shape)
        blocks, covered = [], torch.zeros(index.numel(), dtype=torch.int64)
        for block in w.chunk(parts, dim):
            offset = [0] * len(shape)
            offset[dim] = sum(b.shape[dim] for b in blocks)
            keep, pos = lift.local_positions(index, shape, tuple(block.shape), tuple(offset))
            covered += keep
            blocks.append(block.flatten().index_put((pos[keep],), values[keep]).view(block.shape))
        assert torch.equal(covered, torch.ones_like(covered))  # every entry written by exactly one rank
        assert torch.equal(torch.cat(blocks, dim), expected)
