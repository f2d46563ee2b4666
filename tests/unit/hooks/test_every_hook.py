"""One in-process plugin implements every hook; each is called through the manager the way the trainer calls it.

The trainer's own tests exercise the same hooks inside a real run; these pin down what the manager does with each
answer (merged, attributed, refused) as ``framework/hooks/specs.py`` describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from framework.config import ConfigError, option
from framework.hooks import PluginError, PluginManager, hook_names, hookimpl
from tests.unit.hooks.support import TinyModel, job


@dataclass
class EveryConfig:
    coef: float = option(0.5, doc="Weight of the plugin's loss.", min=0.0)
    max_world: int = option(4, doc="Largest world size the plugin accepts.", min=1)


class Every:
    """Implements every hook and records what it saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.resumed: bool | None = None
        self.steps_begun: list[int] = []
        self.steps_done: list[int] = []
        self.counter = 0

    @hookimpl
    def expertrain_config_sections(self):
        self.calls.append("expertrain_config_sections")
        return {"every": EveryConfig}

    @hookimpl
    def expertrain_register_components(self, registry):
        self.calls.append("expertrain_register_components")
        registry.register("router", "every_router", lambda: "router")

    @hookimpl
    def expertrain_validate_config(self, config, world_size):
        self.calls.append("expertrain_validate_config")
        if world_size > config.every.max_world:
            raise ConfigError(
                "every.max_world", config.every.max_world, f"expected at least the world size {world_size}"
            )

    @hookimpl
    def expertrain_transform_model(self, model, config):
        self.calls.append("expertrain_transform_model")
        model.every_scale = torch.nn.Parameter(torch.ones(()))

    @hookimpl
    def expertrain_init_weights(self, model, config, init, resumed):
        self.calls.append("expertrain_init_weights")
        with torch.no_grad():
            model.every_scale.fill_(1.5)

    @hookimpl
    def expertrain_trainable_parameters(self, model, config):
        return ["every_scale"]

    @hookimpl
    def expertrain_after_parallelize(self, model, config, resumed):
        self.resumed = resumed
        if not resumed:
            with torch.no_grad():
                model.every_scale.fill_(2.0)

    @hookimpl
    def expertrain_optimizer_param_groups(self, model, config):
        return [{"params": [model.every_scale], "lr": 0.5, "weight_decay": 0.0}]

    @hookimpl
    def expertrain_after_optimizer(self, model, optimizer, config):
        self.optimizer = optimizer

    @hookimpl
    def expertrain_step_begin(self, step, model, optimizer, config):
        self.steps_begun.append(step)

    @hookimpl
    def expertrain_extra_losses(self, model, input_ids, logits, config):
        return {"every_scale_l2": config.every.coef * model.every_scale.pow(2)}

    @hookimpl
    def expertrain_after_backward(self, step, model, config):
        model.every_scale.grad.mul_(0.5)  # grads may be changed in place

    @hookimpl
    def expertrain_after_optimizer_step(self, step, model, optimizer, config):
        self.steps_done.append(step)
        self.counter += 1

    @hookimpl
    def expertrain_metrics(self, step, model, config):
        return {"every/scale": model.every_scale.detach(), "every/step": step}

    @hookimpl
    def expertrain_state_dict(self, model, config):
        return {"counter": self.counter}

    @hookimpl
    def expertrain_load_state_dict(self, model, state, config):
        self.counter = state["counter"]

    @hookimpl
    def expertrain_export_tensors(self, model, config, export_format):
        return ["weight"] if export_format == "every" else None

    @hookimpl
    def expertrain_export(self, model, config, output_dir, export_format):
        if export_format != "every":
            return None
        (output_dir / "every.txt").write_text(f"{model.every_scale.item()}\n")
        return ["every.txt"]

    @hookimpl
    def expertrain_merge_tensor(self, model, config, name, tensor):
        return None  # every_scale changes no base tensor

    @hookimpl
    def expertrain_merge_adapters(self, model, config):
        # every_scale does not enter the forward: merging leaves the base model's tensors only.
        del model.every_scale
        return ["every_scale"]

    @hookimpl
    def expertrain_train_end(self, model, summary, config):
        summary["every"] = f"{self.counter} steps"


class Other:
    """A second plugin without opinions, to show that merging keeps answers apart."""

    @hookimpl
    def expertrain_trainable_parameters(self, model, config):
        return None

    @hookimpl
    def expertrain_metrics(self, step, model, config):
        return {"other/ok": 1}


def test_the_every_plugin_covers_every_hook():
    pm = PluginManager()
    pm.register_object("every", Every())
    assert pm.hooks_implemented("every") == hook_names()


def test_every_hook_through_the_manager(tmp_path: Path):
    every = Every()
    pm = PluginManager()
    pm.register_object("every", every)
    pm.register_object("other", Other())

    # registration: sections and components are collected at load
    assert every.calls == ["expertrain_config_sections", "expertrain_register_components"]
    assert pm.config_sections == {"every": EveryConfig}
    assert pm.registry.get("router", "every_router").owner == "every"
    config = job(pm, every={"coef": 0.25})
    assert config.every.coef == 0.25

    pm.hook.expertrain_validate_config(config=config, world_size=2)
    with pytest.raises(ConfigError, match="every.max_world.*reported by plugin 'every'"):
        pm.hook.expertrain_validate_config(config=config, world_size=8)

    # build
    model = TinyModel()
    pm.hook.expertrain_transform_model(model=model, config=config)
    trainable = pm.trainable_names(model, config)
    assert trainable == {"every_scale"}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    pm.hook.expertrain_init_weights(model=model, config=config, init=None, resumed=False)
    assert model.every_scale.item() == 1.5
    pm.hook.expertrain_after_parallelize(model=model, config=config, resumed=False)
    assert every.resumed is False and model.every_scale.item() == 2.0
    groups = pm.param_groups(model, config)
    assert [(g["plugin"], g["lr"]) for g in groups] == [("every", 0.5)]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    pm.hook.expertrain_after_optimizer(model=model, optimizer=optimizer, config=config)
    assert every.optimizer is optimizer

    # one step
    pm.hook.expertrain_step_begin(step=1, model=model, optimizer=optimizer, config=config)
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    logits = model(torch.randn(2, 3, 4))
    losses = pm.merge_extra_losses(model=model, input_ids=input_ids, logits=logits, config=config)
    assert list(losses) == ["every_scale_l2"] and losses["every_scale_l2"].item() == pytest.approx(0.25 * 4.0)
    (logits.mean() + sum(losses.values())).backward()
    assert model.every_scale.grad.item() == pytest.approx(0.25 * 2 * 2.0)
    pm.hook.expertrain_after_backward(step=1, model=model, config=config)
    assert model.every_scale.grad.item() == pytest.approx(0.5)
    optimizer.step()
    assert model.every_scale.item() == pytest.approx(2.0 - 0.5 * 0.5)  # the plugin's lr, not the default 0.1
    pm.hook.expertrain_after_optimizer_step(step=1, model=model, optimizer=optimizer, config=config)
    metrics = pm.merge_metrics(step=1, model=model, config=config)
    assert metrics == {"every/scale": pytest.approx(1.75), "every/step": 1.0, "other/ok": 1.0}
    assert every.steps_begun == every.steps_done == [1]

    # state
    states = pm.plugin_state_dicts(model, config)
    assert states == {"every": {"counter": 1}}
    resumed = Every()
    pm2 = PluginManager()
    pm2.register_object("every", resumed)
    pm2.hook.expertrain_after_parallelize(model=model, config=config, resumed=True)
    assert resumed.resumed is True and model.every_scale.item() == pytest.approx(1.75)  # skipped on resume
    pm2.load_plugin_state_dicts(states, model, config)
    assert resumed.counter == 1

    # export and end
    written = pm.call_per_plugin(
        "expertrain_export", model=model, config=config, output_dir=tmp_path, export_format="every"
    )
    assert written == {"every": ["every.txt"]} and (tmp_path / "every.txt").read_text() == "1.75\n"
    assert (
        pm.call_per_plugin(
            "expertrain_export", model=model, config=config, output_dir=tmp_path, export_format="hf"
        )
        == {}
    )
    summary: dict = {}
    pm.hook.expertrain_train_end(model=model, summary=summary, config=config)
    assert summary == {"every": "1 steps"}

    # merge for `export hf --merge`: the plugin folds its parameter in and leaves the base tensors only
    x = torch.randn(2, 3, 4)
    before = model(x)
    assert pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config) == {
        "every": ["every_scale"]
    }
    assert set(dict(model.named_parameters())) == {"a.weight", "a.bias", "b.weight"}
    torch.testing.assert_close(model(x), before)


def test_two_every_plugins_collide_where_the_specs_say_they_must():
    pm = PluginManager()
    pm.register_object("every", Every())

    class Again(Every):
        @hookimpl
        def expertrain_config_sections(self):
            return {"every_again": EveryConfig}

        @hookimpl
        def expertrain_register_components(self, registry):
            registry.register("router", "again_router", lambda: "router")

    pm.register_object("again", Again())
    config = job(pm)
    model = TinyModel()
    pm.hook.expertrain_transform_model(model=model, config=config)
    config.plugin_sections["every"] = config.every_again  # both read config.every
    with pytest.raises(
        PluginError, match="loss name 'every_scale_l2' is returned by two plugins, 'every' and 'again'"
    ):
        pm.merge_extra_losses(model=model, input_ids=None, logits=None, config=config)
    with pytest.raises(PluginError, match="metric 'every/scale' is returned by two plugins"):
        pm.merge_metrics(step=1, model=model, config=config)
    with pytest.raises(PluginError, match="parameter 'every_scale' is claimed by two optimizer groups"):
        pm.param_groups(model, config)
    assert pm.trainable_names(model, config) == {
        "every_scale"
    }  # the same name from two plugins is fine: a union


class TransformOnly:
    """Transforms the model without an init hook: its transform is taken to read real weights."""

    @hookimpl
    def expertrain_transform_model(self, model, config):
        model.scaled = torch.nn.Parameter(model.weight.detach() * 2)


def test_a_transform_without_an_init_hook_is_reported_as_needing_real_weights():
    pm = PluginManager()
    pm.register_object("every", Every())
    assert pm.transforms_needing_weights() == []  # transform + init hook: structure only, meta is fine
    pm.register_object("transform_only", TransformOnly())
    pm.register_object("other", Other())  # no transform at all
    assert pm.transforms_needing_weights() == ["transform_only"]
