"""After a checkpoint's optimizer and scheduler state are loaded, the job's optimization settings win: each param
group (plugin groups with their own lr rule included) gets the hyperparameters this job's ``build_optimizer`` gave
it, the schedule keeps its position with the job's base lrs, and the saved moments are kept."""

from __future__ import annotations

import copy

import torch
from torch import nn

from framework.config import OptimConfig
from framework.train.optim import (
    apply_group_settings,
    build_optimizer,
    build_scheduler,
    group_settings,
    load_scheduler_state,
    lr_factor,
    optim_changes,
)

STEPS = 10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _build(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A plugin group at twice the job's lr and without decay (a rule like an adapter plugin's), then the defaults."""
    plugin = [{"params": [model[2].weight], "lr": 2 * cfg.lr, "weight_decay": 0.0, "group_name": "adapter"}]
    optimizer = build_optimizer(model, cfg, plugin, torch.device("cpu"))
    return optimizer, build_scheduler(optimizer, STEPS, cfg)


def _train(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_loaded_state_takes_the_jobs_settings_and_keeps_moments() -> None:
    saved_cfg = OptimConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, warmup_steps=2)
    model = _model()
    optimizer, scheduler = _build(model, saved_cfg)
    _train(model, optimizer, scheduler)
    optim_state, sched_state = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())

    job_cfg = OptimConfig(lr=3e-3, weight_decay=0.01, beta1=0.8, beta2=0.99, eps=1e-6, warmup_steps=2)
    resumed = _model()
    optimizer, scheduler = _build(resumed, job_cfg)
    settings = group_settings(optimizer)
    optimizer.load_state_dict(optim_state)
    load_scheduler_state(scheduler, sched_state)
    apply_group_settings(scheduler, settings)

    factor = lr_factor(3, STEPS, job_cfg)  # three scheduler steps were taken before the save
    expected = [  # (lr, weight_decay) per group, as build_optimizer makes them for job_cfg
        (2 * job_cfg.lr * factor, 0.0),  # the plugin's group: twice the job's lr, no decay
        (job_cfg.lr * factor, job_cfg.weight_decay),  # matrices
        (job_cfg.lr * factor, 0.0),  # norms and biases
    ]
    got = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert len(got) == len(expected)
    for (lr, wd), (want_lr, want_wd) in zip(got, expected, strict=True):
        assert abs(lr - want_lr) <= 1e-15 and wd == want_wd, (got, expected)
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert scheduler.base_lrs == [2 * job_cfg.lr, job_cfg.lr, job_cfg.lr]
    assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
    # The moments are the checkpoint's: only hyperparameters changed.
    for index, state in optim_state["state"].items():
        torch.testing.assert_close(
            optimizer.state_dict()["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=0
        )
    # The next step follows the job's schedule.
    scheduler.step()
    assert abs(optimizer.param_groups[1]["lr"] - job_cfg.lr * lr_factor(4, STEPS, job_cfg)) <= 1e-15


def test_changed_keys_are_named_one_line_each() -> None:
    saved = OptimConfig(lr=1e-3).__dict__
    lines = optim_changes(saved, OptimConfig(lr=3e-3, warmup_steps=5), step=7)
    assert lines == [
        "resuming with optim.lr 0.003 (checkpoint 0.001): the schedule continues from step 7 with the new value",
        "resuming with optim.warmup_steps 5 (checkpoint 20): the schedule continues from step 7 with the new value",
    ]
    assert optim_changes(saved, OptimConfig(lr=1e-3), step=7) == []
