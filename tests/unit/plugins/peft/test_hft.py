"""The hft plugin: the category-level selection (per block 2 of q/k/v/o, 2 or 1 of gate/up/down in halves of the
blocks, 1 of 2 norms, half of the experts; embeddings, final norm and head trained), its seeding by (seed, stage),
real AdamW steps with weight decay that leave every frozen weight — whole tensors and masked expert slices —
bit-identical (``torch.equal``) with no gradient / optimizer state / moments, stage changes, and the checkpointed state.

No tolerances: frozen weights must be exactly unchanged, and the decoupled decay the plugin applies to trained
experts is the very operation torch's AdamW performs, so it must match bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from framework.config import ConfigError, JobConfig, resolve, section_docs
from framework.hooks import PluginManager
from framework.models import Transformer, default_registry
from framework.train.optim import build_optimizer
from plugins.peft import hft

REPO = Path(__file__).resolve().parents[4]
MODEL = {
    "dim": 32,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden": 48,
    "max_seq_len": 16,
    "vocab_size": 64,
}
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _job(
    moe: dict[str, Any] | None = None, **section: Any
) -> tuple[Transformer, JobConfig, PluginManager, hft.HFTPlugin]:
    plugin = hft.HFTPlugin()
    pm = PluginManager(default_registry())
    pm.register_object("hft", plugin)
    raw = {
        "plugins": ["hft"],
        "model": MODEL,
        "moe": moe or {"num_experts": 4, "expert_hidden": 24, "every": 2},  # layers 0, 2 MoE; 1, 3 dense
        "data": {"seq_len": 16},
        "optim": {"weight_decay": 0.1, "lr": 1e-2, "warmup_steps": 0},
        "hft": section,
    }
    config = resolve(raw, pm.config_sections)
    pm.hook.expertrain_validate_config(config=config, world_size=1)
    model = Transformer(config.model, config.moe, pm.registry)
    model.init_weights(0)
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model, config, pm, plugin


def _optimizer(model: nn.Module, config: JobConfig, pm: PluginManager) -> torch.optim.Optimizer:
    """The real AdamW (plugin groups, weight decay), handed to the plugins as the trainer does."""
    optimizer = build_optimizer(model, config.optim, pm.param_groups(model, config), torch.device("cpu"))
    pm.hook.expertrain_after_optimizer(model=model, optimizer=optimizer, config=config)
    return optimizer


def _run_steps(
    model: nn.Module,
    config: JobConfig,
    pm: PluginManager,
    optimizer: torch.optim.Optimizer,
    steps: range,
    probe: Any = None,
) -> None:
    """The trainer's full step sequence, after_optimizer_step included."""
    for step in steps:
        pm.hook.expertrain_step_begin(step=step, model=model, optimizer=optimizer, config=config)
        model(IDS).logsumexp(-1).mean().backward()
        pm.hook.expertrain_after_backward(step=step, model=model, config=config)
        if probe is not None:
            probe(step, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pm.hook.expertrain_after_optimizer_step(step=step, model=model, optimizer=optimizer, config=config)


def _train(
    model: nn.Module, config: JobConfig, pm: PluginManager, steps: int, probe: Any = None
) -> torch.optim.Optimizer:
    """The trainer's step sequence with the real AdamW, steps 1 to ``steps``."""
    optimizer = _optimizer(model, config, pm)
    _run_steps(model, config, pm, optimizer, range(1, steps + 1), probe)
    return optimizer


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_selection_is_category_level_per_block() -> None:
    model, _, _, plugin = _job(moe={"num_experts": 0})  # 4 dense blocks
    sel = plugin.selection
    assert sel is not None and sel.stage == 0 and not sel.experts
    trained = set(sel.trained)
    ffn_counts = []
    for i in range(4):
        attn = [
            p
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            if f"layers.{i}.attention.{p}.weight" in trained
        ]
        assert len(attn) == 2
        ffn_counts.append(sum(f"layers.{i}.ffn.{p}.weight" in trained for p in hft.FFN_PROJECTIONS))
        assert sum(f"layers.{i}.{n}.weight" in trained for n in hft.BLOCK_NORMS) == 1
    assert sorted(ffn_counts) == [1, 1, 2, 2]  # 2 of 3 in a half of the blocks, 1 of 3 in the other half
    assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= trained
    assert set(sel.frozen) | trained == {n for n, _ in model.named_parameters()}
    assert not set(sel.frozen) & trained
    # Whole matrices: 2·4 + 6 + 4 of the 4·(4 + 3 + 2) block tensors are frozen
    assert len(sel.frozen) == 8 + 6 + 4


def test_moe_blocks_train_half_of_the_experts_and_the_router_by_option() -> None:
    model, _, _, plugin = _job()
    sel = plugin.selection
    assert sel is not None
    assert set(sel.experts) == {"layers.0.ffn.experts", "layers.2.ffn.experts"}
    assert all(len(ids) == 2 and len(set(ids)) == 2 and max(ids) < 4 for ids in sel.experts.values())
    assert not any(".experts." in n for n in sel.trained + sel.frozen)  # masked slices, not whole tensors
    assert "layers.0.ffn.router.gate.weight" in sel.trained
    _, _, _, frozen_router = _job(train_router=False)
    assert "layers.0.ffn.router.gate.weight" in frozen_router.selection.frozen


def test_selection_is_seeded_by_seed_and_stage() -> None:
    model, _, _, _ = _job()
    a, b = hft.select(model, 3, 0), hft.select(model, 3, 0)
    assert (a.trained, a.experts) == (b.trained, b.experts)
    stages = [hft.select(model, 3, s) for s in range(1, 6)]
    assert any((s.trained, s.experts) != (a.trained, a.experts) for s in stages)
    key = lambda s: (s.trained, s.experts)  # noqa: E731
    assert any(key(hft.select(model, 4, s)) != key(hft.select(model, 3, s)) for s in range(4))
    assert [hft.stage_of(s, 3) for s in (1, 3, 4, 7)] == [0, 0, 1, 2]
    assert hft.stage_of(100, 0) == 0


def _expert_rows(model: nn.Module, sel: hft.Selection) -> dict[str, tuple[list[int], list[int]]]:
    out = {}
    for path, ids in sel.experts.items():
        E = model.get_submodule(path).num_experts
        for n in ("gate_up_proj", "down_proj"):
            out[f"{path}.{n}"] = (ids, [e for e in range(E) if e not in ids])
    return out


def test_frozen_weights_stay_bit_identical_with_weight_decay_and_have_no_state() -> None:
    model, config, pm, plugin = _job()
    sel = plugin.selection
    before = _snapshot(model)
    seen: list[int] = []

    def probe(step: int, optimizer: torch.optim.Optimizer) -> None:
        params = dict(model.named_parameters())
        assert all(params[n].grad is None for n in sel.frozen)  # frozen: no gradient at all
        for name, (_, frozen_ids) in _expert_rows(model, sel).items():
            assert torch.count_nonzero(params[name].grad[frozen_ids]) == 0
        seen.append(step)

    optimizer = _train(model, config, pm, 3, probe)
    assert seen == [1, 2, 3]
    params = dict(model.named_parameters())
    after = _snapshot(model)
    for name in sel.frozen:
        assert torch.equal(after[name], before[name]), name
        assert params[name] not in optimizer.state
    for name in sel.trained:
        assert not torch.equal(after[name], before[name]), name
    # Optimizer state: exactly the trained tensors and the expert weights (trained slices live in those tensors).
    expert_names = list(_expert_rows(model, sel))
    assert len(optimizer.state) == len(sel.trained) + len(expert_names)
    for name, (trained_ids, frozen_ids) in _expert_rows(model, sel).items():
        assert torch.equal(after[name][frozen_ids], before[name][frozen_ids]), name
        assert not torch.equal(after[name][trained_ids], before[name][trained_ids]), name
        state = optimizer.state[params[name]]
        assert torch.count_nonzero(state["exp_avg"][frozen_ids]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][frozen_ids]) == 0
    # The expert weights are decayed by the plugin, not by AdamW.
    group = next(g for g in optimizer.param_groups if g.get("group_name") == hft.EXPERT_GROUP)
    assert group["weight_decay"] == 0.0 and group["plugin"] == "hft"


def test_plugin_decays_trained_expert_rows_exactly_as_adamw_weight_decay() -> None:
    """The plugin's expert group has no AdamW decay; its after_backward decays the trained rows itself. Independent
    reference: each trained expert row, stepped alone by torch's AdamW *with* ``weight_decay`` (same lr per step, same
    gradients, the same fused kernel) from its initial value, ends where the plugin's job leaves it, bit for bit.
    Frozen rows never move. Without the plugin's decay the rows would differ by ~lr·wd·|w| per step."""
    model, config, pm, plugin = _job()
    sel = plugin.selection
    params = dict(model.named_parameters())
    rows = _expert_rows(model, sel)
    before = _snapshot(model)
    grads: list[dict[str, torch.Tensor]] = []
    lrs: list[float] = []

    def probe(step: int, optimizer: torch.optim.Optimizer) -> None:
        grads.append({n: params[n].grad.clone() for n in rows})
        lrs.append(next(g["lr"] for g in optimizer.param_groups if g.get("group_name") == hft.EXPERT_GROUP))

    _train(model, config, pm, 3, probe)
    opt = config.optim
    assert opt.weight_decay > 0
    checked = 0
    for name, (trained_ids, frozen_ids) in rows.items():
        assert torch.equal(params[name].detach()[frozen_ids], before[name][frozen_ids]), name
        for e in trained_ids:
            row = nn.Parameter(before[name][e].clone())
            reference = torch.optim.AdamW(
                [row],
                lr=lrs[0],
                betas=(opt.beta1, opt.beta2),
                eps=opt.eps,
                weight_decay=opt.weight_decay,
                fused=True,
            )
            for lr, step_grads in zip(lrs, grads):
                reference.param_groups[0]["lr"] = lr
                row.grad = step_grads[name][e].clone()
                reference.step()
            assert torch.equal(params[name].detach()[e], row.detach()), (name, e)
            undecayed = nn.Parameter(before[name][e].clone())
            plain = torch.optim.AdamW(
                [undecayed],
                lr=lrs[0],
                betas=(opt.beta1, opt.beta2),
                eps=opt.eps,
                weight_decay=0.0,
                fused=True,
            )
            for lr, step_grads in zip(lrs, grads):
                plain.param_groups[0]["lr"] = lr
                undecayed.grad = step_grads[name][e].clone()
                plain.step()
            assert not torch.equal(undecayed.detach(), row.detach())  # the decay is visible at this scale
            checked += 1
    assert checked == 2 * 2 * 2  # 2 MoE layers x 2 expert weights x 2 trained experts


def test_stages_reselect_and_frozen_parameters_get_a_fresh_state() -> None:
    model, config, pm, plugin = _job(stage_every=2)
    assert set(pm.trainable_names(model, config)) == {n for n, _ in model.named_parameters()}
    stages: list[hft.Selection] = []
    snapshots: list[dict[str, torch.Tensor]] = []

    def probe(step: int, optimizer: torch.optim.Optimizer) -> None:
        sel = plugin.selection
        params = dict(model.named_parameters())
        if not stages or stages[-1].stage != sel.stage:
            stages.append(sel)
            snapshots.append(_snapshot(model))
        assert all(params[n].grad is None for n in sel.frozen)
        for n in sel.frozen:  # the state of frozen tensors is a fresh one: step 0, moments 0
            assert all(torch.count_nonzero(v) == 0 for v in optimizer.state[params[n]].values()), n
        for name, (_, frozen_ids) in _expert_rows(model, sel).items():
            state = optimizer.state.get(params[name], {})
            if state:
                assert torch.count_nonzero(state["exp_avg"][frozen_ids]) == 0, name

    _train(model, config, pm, 4, probe)
    assert [s.stage for s in stages] == [0, 1]
    assert set(stages[1].frozen) & set(stages[0].trained)  # some state was reset at the boundary
    # Within stage 1 (steps 3-4) its frozen weights and expert slices did not move.
    after = _snapshot(model)
    for name in stages[1].frozen:
        assert torch.equal(after[name], snapshots[1][name]), name
    for name, (_, frozen_ids) in _expert_rows(model, stages[1]).items():
        assert torch.equal(after[name][frozen_ids], snapshots[1][name][frozen_ids]), name


def test_state_round_trips_and_a_different_selection_is_refused() -> None:
    model, config, pm, plugin = _job()
    state = pm.plugin_state_dicts(model, config)["hft"]
    model2, config2, pm2, plugin2 = _job()
    plugin2.selection = hft.select(model2, 0, 5)  # as if elsewhere; loading restores the saved one
    plugin2.expertrain_load_state_dict(model2, state, _job(stage_every=3)[1])
    assert plugin2.selection == plugin.selection
    _, other_config, _, other = _job(seed=7)
    with pytest.raises(ConfigError, match="hft.seed"):
        other.expertrain_load_state_dict(model, state, other_config)


def test_deepspeed_with_masks_is_refused() -> None:
    plugin = hft.HFTPlugin()
    pm = PluginManager(default_registry())
    pm.register_object("hft", plugin)
    raw = {
        "plugins": ["hft"],
        "model": MODEL,
        "moe": {"num_experts": 4, "expert_hidden": 24},
        "data": {"seq_len": 16},
        "train": {"engine": "deepspeed"},
    }
    config = resolve(raw, pm.config_sections)
    with pytest.raises(ConfigError, match="train.engine"):
        pm.hook.expertrain_validate_config(config=config, world_size=1)


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (REPO / "docs" / "plugins" / "hft.md").read_text(encoding="utf-8")
    for field, typ, default, meaning in section_docs(hft.HFTConfig):
        row = f"| `hft.{field}` | {typ} | `{default}` | {meaning} |"
        assert row in doc, f"docs/plugins/hft.md is stale for hft.{field}: expected the row\n{row}"


# --- Adam's age of expert rows across stage boundaries ------------------------------------------------------------


def _staged_job() -> tuple[Transformer, JobConfig, PluginManager, hft.HFTPlugin, torch.optim.Optimizer]:
    model, config, pm, plugin = _job(stage_every=2)
    return model, config, pm, plugin, _optimizer(model, config, pm)


def test_experts_trained_anew_at_a_stage_boundary_step_like_a_fresh_adamw() -> None:
    """Step 3 opens stage 1. Independent reference, per expert row: a new expert's row equals a fresh torch AdamW's
    first step (same lr, betas, eps, weight decay) on that row with the same gradient; a continuing expert's row
    equals torch's AdamW step from the row's own state (step 2, its moments). Tolerance: fp32 round-off (rtol 1e-6,
    atol 1e-8 on weights of ~0.02 moved by ~1e-2): the plugin recomputes the same formula outside the fused kernel.
    Uncorrected, a new row would move by (1−β1)/(1−β1³)·√((1−β2³)/(1−β2)) ≈ 0.62× a fresh step here."""
    model, config, pm, plugin, optimizer = _staged_job()
    params = dict(model.named_parameters())
    _run_steps(model, config, pm, optimizer, range(1, 3))
    stage0 = plugin.selection
    before = _snapshot(model)
    states = {
        n: {k: v.clone() for k, v in optimizer.state[params[n]].items()} for n in _expert_rows(model, stage0)
    }
    grads: dict[str, torch.Tensor] = {}

    def probe(step: int, optimizer: torch.optim.Optimizer) -> None:
        grads.update({n: params[n].grad.clone() for n in _expert_rows(model, plugin.selection)})

    _run_steps(model, config, pm, optimizer, range(3, 4), probe)
    stage1 = plugin.selection
    assert stage1.stage == 1
    opt = config.optim
    hyper = {"lr": opt.lr, "betas": (opt.beta1, opt.beta2), "eps": opt.eps, "weight_decay": opt.weight_decay}
    new_rows = continuing_rows = 0
    for name, (trained_ids, _) in _expert_rows(model, stage1).items():
        path = name.rsplit(".", 1)[0]
        for e in trained_ids:
            row = nn.Parameter(before[name][e].clone())
            reference = torch.optim.AdamW([row], **hyper)
            if e in stage0.experts[path]:
                continuing_rows += 1
                state = states[name]
                reference.state[row] = {
                    "step": state["step"].clone(),
                    "exp_avg": state["exp_avg"][e].clone(),
                    "exp_avg_sq": state["exp_avg_sq"][e].clone(),
                }
            else:
                new_rows += 1
                assert plugin.moment_start[path][e] == 2, (name, e)
            row.grad = grads[name][e].clone()
            reference.step()
            torch.testing.assert_close(params[name].detach()[e], row.detach(), rtol=1e-6, atol=1e-8)
    assert new_rows and continuing_rows  # both kinds were checked


def test_resume_after_a_stage_boundary_repeats_the_uninterrupted_steps_bit_for_bit() -> None:
    """The experts' moment starts travel in the plugin state: a job rebuilt from the step-3 model, optimizer and
    plugin states takes steps 4-5 exactly as the uninterrupted job (``torch.equal``)."""
    model, config, pm, _, optimizer = _staged_job()
    _run_steps(model, config, pm, optimizer, range(1, 4))
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = copy.deepcopy(optimizer.state_dict())  # a checkpoint's copy, not the live tensors
    plugin_state = copy.deepcopy(pm.plugin_state_dicts(model, config)["hft"])
    assert any(any(starts) for starts in plugin_state["moment_start"].values())
    model2, config2, pm2, plugin2, optimizer2 = _staged_job()
    model2.load_state_dict(model_state)
    optimizer2.load_state_dict(optim_state)
    plugin2.expertrain_load_state_dict(model2, plugin_state, config2)
    _run_steps(model, config, pm, optimizer, range(4, 6))
    _run_steps(model2, config2, pm2, optimizer2, range(4, 6))
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
