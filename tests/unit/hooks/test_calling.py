"""Calling hooks: plugin order, error wrapping, tracing, and the helpers that merge or refuse plugin answers."""

from __future__ import annotations

import pytest
import torch

from framework.config import ConfigError
from framework.hooks import PluginError, PluginHookError, PluginManager, hookimpl


class Raises:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    @hookimpl
    def expertrain_step_begin(self, step):
        raise self.exc

    @hookimpl
    def expertrain_validate_config(self, config, world_size):
        raise self.exc


class Records:
    def __init__(self) -> None:
        self.steps: list[int] = []

    @hookimpl
    def expertrain_step_begin(self, step):
        self.steps.append(step)


# --- errors ------------------------------------------------------------------------------------------------------


def test_exception_in_a_hook_becomes_plugin_hook_error_naming_plugin_and_hook():
    pm = PluginManager()
    pm.register_object("good", Records())
    pm.register_object("bad", Raises(ValueError("boom")))
    with pytest.raises(PluginHookError) as info:
        pm.hook.expertrain_step_begin(step=1, model=None, optimizer=None, config=None)
    err = info.value
    assert str(err) == "plugin 'bad' failed in hook expertrain_step_begin: ValueError: boom"
    assert (err.plugin, err.hook) == ("bad", "expertrain_step_begin")
    assert isinstance(err.__cause__, ValueError) and err.original is err.__cause__


def test_helpers_wrap_errors_the_same_way():
    pm = PluginManager()
    pm.register_object("bad", Raises(KeyError("missing")))
    with pytest.raises(PluginHookError, match="plugin 'bad' failed in hook expertrain_step_begin: KeyError"):
        pm.call_per_plugin("expertrain_step_begin", step=1, model=None, optimizer=None, config=None)


def test_config_error_stays_a_config_error_and_names_the_plugin():
    pm = PluginManager()
    pm.register_object("strict", Raises(ConfigError("strict.rank", 3, "expected a divisor of world size 4")))
    with pytest.raises(ConfigError) as info:
        pm.hook.expertrain_validate_config(config=None, world_size=4)
    assert not isinstance(info.value, PluginHookError)
    assert str(info.value) == (
        "config key 'strict.rank': got 3; expected a divisor of world size 4 "
        "(reported by plugin 'strict' in expertrain_validate_config)"
    )
    assert info.value.key == "strict.rank"


def test_wrapper_implementations_are_guarded_and_do_not_steal_the_blame():
    class Timing:
        def __init__(self, fail_before: bool = False, fail_after: bool = False) -> None:
            self.fail_before, self.fail_after, self.seen = fail_before, fail_after, []

        @hookimpl(wrapper=True)
        def expertrain_step_begin(self, step):
            if self.fail_before:
                raise RuntimeError("before")
            try:
                result = yield
            except Exception as exc:
                self.seen.append(type(exc).__name__)
                raise
            if self.fail_after:
                raise RuntimeError("after")
            return result

    # An inner plugin's failure passes through the wrapper still naming the inner plugin.
    pm = PluginManager()
    timing = Timing()
    pm.register_object("inner", Raises(ValueError("inner failed")))
    pm.register_object("timing", timing)
    with pytest.raises(PluginHookError, match="plugin 'inner' failed"):
        pm.hook.expertrain_step_begin(step=1, model=None, optimizer=None, config=None)
    assert timing.seen == ["PluginHookError"]

    for kwargs in ({"fail_before": True}, {"fail_after": True}):
        pm = PluginManager()
        pm.register_object("records", Records())
        pm.register_object("timing", Timing(**kwargs))
        with pytest.raises(
            PluginHookError, match="plugin 'timing' failed in hook expertrain_step_begin: RuntimeError"
        ):
            pm.hook.expertrain_step_begin(step=1, model=None, optimizer=None, config=None)


# --- tracing -----------------------------------------------------------------------------------------------------


def test_tracing_env_var_logs_every_hook_call_with_rank(monkeypatch, capsys):
    monkeypatch.setenv("EXPERTRAIN_TRACE_HOOKS", "1")
    monkeypatch.setenv("RANK", "3")
    pm = PluginManager()
    pm.register_object("first", Records())
    pm.register_object("second", Records())
    capsys.readouterr()
    pm.hook.expertrain_step_begin(step=7, model=None, optimizer=None, config=None)
    lines = [line for line in capsys.readouterr().err.splitlines() if "expertrain_step_begin" in line]
    assert len(lines) == 1
    assert lines[0].startswith("[rank 3] hook expertrain_step_begin [first, second] ")
    assert lines[0].endswith(" ms")


def test_tracing_reports_a_failing_call(monkeypatch, capsys):
    monkeypatch.setenv("EXPERTRAIN_TRACE_HOOKS", "1")
    pm = PluginManager()
    pm.register_object("bad", Raises(ValueError("x")))
    with pytest.raises(PluginHookError):
        pm.hook.expertrain_step_begin(step=1, model=None, optimizer=None, config=None)
    assert "raised PluginHookError" in capsys.readouterr().err


def test_no_tracing_without_the_env_var(monkeypatch, capsys):
    monkeypatch.delenv("EXPERTRAIN_TRACE_HOOKS", raising=False)
    pm = PluginManager()
    pm.register_object("first", Records())
    pm.hook.expertrain_step_begin(step=7, model=None, optimizer=None, config=None)
    assert "expertrain_step_begin" not in capsys.readouterr().err


# --- helpers -----------------------------------------------------------------------------------------------------


class Answers:
    """A plugin whose answers the test chooses."""

    def __init__(self, losses=None, metrics=None, trainable=None, groups=None, state=None):
        self.losses, self.metrics, self.trainable, self.groups, self.state = (
            losses,
            metrics,
            trainable,
            groups,
            state,
        )
        self.loaded = None

    @hookimpl
    def expertrain_extra_losses(self, logits):
        return self.losses

    @hookimpl
    def expertrain_metrics(self, step):
        return self.metrics

    @hookimpl
    def expertrain_trainable_parameters(self, model):
        return self.trainable(model) if callable(self.trainable) else self.trainable

    @hookimpl
    def expertrain_optimizer_param_groups(self, model):
        return self.groups(model) if callable(self.groups) else self.groups

    @hookimpl
    def expertrain_state_dict(self):
        return self.state

    @hookimpl
    def expertrain_load_state_dict(self, state):
        self.loaded = state


def _manager(**plugins) -> PluginManager:
    pm = PluginManager()
    for name, plugin in plugins.items():
        pm.register_object(name, plugin)
    return pm


def test_call_per_plugin_maps_each_answer_to_its_plugin_and_skips_none():
    pm = _manager(a=Answers(metrics={"a/x": 1}), silent=Answers(), b=Answers(metrics={"b/x": 2}))
    assert pm.call_per_plugin("expertrain_metrics", step=1, model=None, config=None) == {
        "a": {"a/x": 1},
        "b": {"b/x": 2},
    }
    assert pm.call_plugin("b", "expertrain_metrics", step=1, model=None, config=None) == {"b/x": 2}
    with pytest.raises(ValueError, match="not an expertrain hook; did you mean 'expertrain_metrics'"):
        pm.call_per_plugin("expertrain_metric", step=1, model=None, config=None)


def test_extra_losses_are_merged_and_a_name_from_two_plugins_is_refused():
    one = torch.tensor(1.0)
    pm = _manager(a=Answers(losses={"aux": one}), b=Answers(losses={"z": 2 * one}))
    losses = pm.merge_extra_losses(model=None, input_ids=None, logits=None, config=None)
    assert list(losses) == ["aux", "z"] and losses["z"].item() == 2.0

    pm = _manager(a=Answers(losses={"aux": one}), b=Answers(losses={"aux": one}))
    with pytest.raises(PluginError, match="loss name 'aux' is returned by two plugins, 'a' and 'b'"):
        pm.merge_extra_losses(model=None, input_ids=None, logits=None, config=None)


def test_extra_loss_must_be_a_scalar_tensor():
    pm = _manager(a=Answers(losses={"aux": torch.ones(3)}))
    with pytest.raises(
        PluginError, match=r"plugin 'a' returned loss 'aux' as Tensor of shape \(3,\); expected a scalar"
    ):
        pm.merge_extra_losses(model=None, input_ids=None, logits=None, config=None)
    pm = _manager(a=Answers(losses=[torch.tensor(1.0)]))
    with pytest.raises(
        PluginError, match="plugin 'a' returned list from expertrain_extra_losses; expected a mapping"
    ):
        pm.merge_extra_losses(model=None, input_ids=None, logits=None, config=None)


class InputOnlyLoss:
    """An extra loss that declares no ``logits``."""

    @hookimpl
    def expertrain_extra_losses(self, input_ids):
        return None


def test_hook_argument_takers_are_the_plugins_declaring_the_argument_in_plugin_order():
    pm = _manager(b=Answers(), plain=InputOnlyLoss(), a=Answers(), metrics_only=Records())
    assert pm.hook_argument_takers("expertrain_extra_losses", "logits") == ["b", "a"]
    assert pm.hook_argument_takers("expertrain_extra_losses", "input_ids") == ["plain"]
    assert _manager(plain=InputOnlyLoss()).hook_argument_takers("expertrain_extra_losses", "logits") == []
    with pytest.raises(ValueError, match="hook expertrain_extra_losses passes no argument 'logit'"):
        pm.hook_argument_takers("expertrain_extra_losses", "logit")
    with pytest.raises(ValueError, match="not an expertrain hook"):
        pm.hook_argument_takers("expertrain_extra_loss", "logits")


def test_metrics_are_merged_as_floats_and_conflicts_refused():
    pm = _manager(a=Answers(metrics={"a/n": 2, "a/t": torch.tensor(0.5)}))
    assert pm.merge_metrics(step=1, model=None, config=None) == {"a/n": 2.0, "a/t": 0.5}
    pm = _manager(a=Answers(metrics={"m": 1}), b=Answers(metrics={"m": 2}))
    with pytest.raises(PluginError, match="metric 'm' is returned by two plugins, 'a' and 'b'"):
        pm.merge_metrics(step=1, model=None, config=None)
    pm = _manager(a=Answers(metrics={"m": "high"}))
    with pytest.raises(PluginError, match="plugin 'a' returned metric 'm' as str; expected a number"):
        pm.merge_metrics(step=1, model=None, config=None)


def test_collect_mapping_is_the_generic_form():
    pm = _manager(a=Answers(metrics={"x": 1}), b=Answers(metrics={"x": 1}))
    with pytest.raises(PluginError, match="widget 'x' is returned by two plugins"):
        pm.collect_mapping("expertrain_metrics", what="widget", step=1, model=None, config=None)


def test_trainable_names_union_semantics(model):
    every = {n for n, _ in model.named_parameters()}
    assert (
        _manager(n=Answers()).trainable_names(model, None) == every
    )  # nobody has an opinion: train everything
    pm = _manager(
        a=Answers(trainable=["a.weight"]), b=Answers(trainable=["b.weight", "a.weight"]), n=Answers()
    )
    assert pm.trainable_names(model, None) == {"a.weight", "b.weight"}


def test_trainable_unknown_name_or_empty_union_is_an_error(model):
    pm = _manager(a=Answers(trainable=["a.weight"]), typo=Answers(trainable=["a.wieght"]))
    with pytest.raises(
        PluginError, match=r"plugin 'typo' asked to train parameters that the model does not have: 'a.wieght'"
    ):
        pm.trainable_names(model, None)
    with pytest.raises(PluginError, match="no parameter would be trained: plugin\\(s\\) 'empty'"):
        _manager(empty=Answers(trainable=[])).trainable_names(model, None)
    with pytest.raises(PluginError, match="expected a list of parameter names"):
        _manager(s=Answers(trainable="a.weight")).trainable_names(model, None)


def test_param_groups_are_tagged_with_their_plugin(model):
    pm = _manager(
        a=Answers(groups=lambda m: [{"params": (p for p in [m.a.weight]), "lr": 0.1}]),
        b=Answers(groups=lambda m: [{"params": [m.b.weight], "weight_decay": 0.0}]),
        n=Answers(),
    )
    groups = pm.param_groups(model, None)
    assert [(g["plugin"], len(g["params"])) for g in groups] == [("a", 1), ("b", 1)]
    assert groups[0]["params"][0] is model.a.weight and groups[0]["lr"] == 0.1
    torch.optim.AdamW(groups)  # the groups are valid torch param groups


def test_parameter_claimed_twice_is_an_error(model):
    both = lambda m: [{"params": [m.a.weight]}]  # noqa: E731
    with pytest.raises(
        PluginError,
        match="parameter 'a.weight' is claimed by two optimizer groups \\(by plugins 'a' and 'b'\\)",
    ):
        _manager(a=Answers(groups=both), b=Answers(groups=both)).param_groups(model, None)
    twice = lambda m: [{"params": [m.a.weight]}, {"params": [m.a.weight]}]  # noqa: E731
    with pytest.raises(PluginError, match="twice by plugin 'a'"):
        _manager(a=Answers(groups=twice)).param_groups(model, None)


def test_param_group_with_foreign_or_frozen_parameter_is_an_error(model):
    foreign = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(PluginError, match="not a parameter of the model"):
        _manager(a=Answers(groups=[{"params": [foreign]}])).param_groups(model, None)
    model.b.weight.requires_grad_(False)
    with pytest.raises(PluginError, match="frozen parameter 'b.weight'"):
        _manager(a=Answers(groups=lambda m: [{"params": [m.b.weight]}])).param_groups(model, None)
    with pytest.raises(PluginError, match="without 'params'"):
        _manager(a=Answers(groups=[{"lr": 1.0}])).param_groups(model, None)


def test_plugin_state_round_trip_and_unknown_state(model):
    saver = Answers(state={"mask": torch.ones(2), "stage": 1})
    pm = _manager(saver=saver, stateless=Answers())
    states = pm.plugin_state_dicts(model, None)
    assert list(states) == ["saver"]
    assert pm.load_plugin_state_dicts(states, model, None) == ["saver"]
    assert saver.loaded["stage"] == 1

    with pytest.raises(
        PluginError, match="checkpoint holds state of plugin 'gone', which this job does not enable"
    ):
        pm.load_plugin_state_dicts({"gone": {}}, model, None)
    assert pm.load_plugin_state_dicts({"gone": {}}, model, None, strict=False) == []

    class SavesOnly:
        @hookimpl
        def expertrain_state_dict(self):
            return {"x": 1}

    pm.register_object("saves_only", SavesOnly())
    with pytest.raises(
        PluginError, match="'saves_only' saved state .* does not implement expertrain_load_state_dict"
    ):
        pm.load_plugin_state_dicts({"saves_only": {"x": 1}}, model, None)
    with pytest.raises(PluginError, match="returned list from expertrain_state_dict"):
        _manager(bad=Answers(state=[1])).plugin_state_dicts(model, None)
