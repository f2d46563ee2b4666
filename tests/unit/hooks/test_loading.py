"""Loading plugins from entry points and the start-up checks: unknown names, misspelled hooks, clashes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from framework.config import ConfigError, option
from framework.hooks import (
    PluginError,
    PluginHookError,
    PluginManager,
    UnknownPluginError,
    hookimpl,
    installed_plugins,
)

ALPHA = """
from framework.hooks import hookimpl

CALLS = []

@hookimpl
def expertrain_transform_model(model, config):
    CALLS.append("alpha")
"""

BETA = """
from framework.hooks import hookimpl

@hookimpl
def expertrain_transform_model(model, config):
    pass
"""


def test_loads_only_the_plugins_named(make_dist):
    make_dist("pkg-alpha", {"alpha": "loadtest_alpha"}, {"loadtest_alpha": ALPHA})
    make_dist("pkg-beta", {"beta": "loadtest_beta"}, {"loadtest_beta": BETA})
    assert {"alpha", "beta"} <= set(installed_plugins())
    pm = PluginManager()
    pm.load(["alpha"])
    assert pm.plugin_names == ["alpha"]
    assert "loadtest_beta" not in sys.modules  # an installed plugin that is not named is never imported
    assert pm.hooks_implemented("alpha") == ["expertrain_transform_model"]
    pm.hook.expertrain_transform_model(model=None, config=None)
    assert sys.modules["loadtest_alpha"].CALLS == ["alpha"]


def test_entry_point_may_name_an_object_or_a_class(make_dist):
    source = """
from framework.hooks import hookimpl

class Plugin:
    @hookimpl
    def expertrain_metrics(self, step):
        return {"objplugin/step": step}

instance = Plugin()
"""
    make_dist(
        "pkg-obj",
        {"objinst": "loadtest_obj:instance", "objcls": "loadtest_obj:Plugin"},
        {"loadtest_obj": source},
    )
    pm = PluginManager()
    pm.load(["objinst"])
    assert pm.merge_metrics(step=3, model=None, config=None) == {"objplugin/step": 3.0}
    pm2 = PluginManager()
    pm2.load(["objcls"])  # a class is instantiated
    assert pm2.merge_metrics(step=4, model=None, config=None) == {"objplugin/step": 4.0}


def test_unknown_plugin_lists_installed_ones_and_says_how_to_install(make_dist):
    make_dist("pkg-alpha", {"alpha": "loadtest_alpha"}, {"loadtest_alpha": ALPHA})
    with pytest.raises(UnknownPluginError) as info:
        PluginManager().load(["alpah"])
    message = str(info.value)
    assert isinstance(info.value, ConfigError)  # a user mistake in the config: the CLI reports it like one
    assert "'alpah'" in message and "config key 'plugins'" in message
    assert "alpha" in message.split("installed:")[1]
    assert "did you mean 'alpha'" in message
    assert "pip install" in message


def test_a_plugin_that_fails_to_import_is_named(make_dist):
    make_dist("pkg-broken", {"broken": "loadtest_broken"}, {"loadtest_broken": "import no_such_module_xyz\n"})
    with pytest.raises(
        PluginError,
        match=r"plugin 'broken' \(entry point 'loadtest_broken' of pkg-broken 0.1.0\) "
        r"failed to import: ModuleNotFoundError",
    ):
        PluginManager().load(["broken"])


def test_one_name_from_two_distributions_is_refused(make_dist):
    make_dist("pkg-one", {"twin": "loadtest_twin_one"}, {"loadtest_twin_one": BETA})
    make_dist("pkg-two", {"twin": "loadtest_twin_two"}, {"loadtest_twin_two": BETA})
    with pytest.raises(PluginError, match="registered twice") as info:
        PluginManager().load(["twin"])
    assert "pkg-one" in str(info.value) and "pkg-two" in str(info.value)


def test_a_name_listed_twice_is_refused():
    with pytest.raises(PluginError, match="named twice"):
        PluginManager().load(["gradnoise", "gradnoise"])


def test_misspelled_decorated_hook_is_an_error_naming_plugin_and_function(make_dist):
    source = """
from framework.hooks import hookimpl

@hookimpl
def expertrain_step_begn(step):
    pass
"""
    make_dist("pkg-typo", {"typo": "loadtest_typo"}, {"loadtest_typo": source})
    with pytest.raises(PluginError) as info:
        PluginManager().load(["typo"])
    message = str(info.value)
    assert "plugin 'typo'" in message and "expertrain_step_begn" in message
    assert "did you mean 'expertrain_step_begin'" in message


def test_misspelled_undecorated_hook_is_also_caught():
    class Typo:
        def expertrain_after_backwards(self, step):  # no @hookimpl, wrong name
            pass

    with pytest.raises(
        PluginError, match=r"plugin 'typo' implements expertrain_after_backwards.*expertrain_after_backward"
    ):
        PluginManager().register_object("typo", Typo())


def test_undecorated_hook_with_the_right_name_is_called():
    class Plain:
        def expertrain_metrics(self, step):  # forgot @hookimpl: still a hook, like in pytest
            return {"plain/step": step}

    pm = PluginManager()
    pm.register_object("plain", Plain())
    assert pm.merge_metrics(step=2, model=None, config=None) == {"plain/step": 2.0}


def test_optional_hook_of_a_newer_expertrain_is_tolerated():
    class Future:
        @hookimpl(optionalhook=True)
        def expertrain_hook_of_the_future(self):
            pass

    pm = PluginManager()
    pm.register_object("future", Future())
    assert pm.plugin_names == ["future"]


def test_specname_of_an_unknown_hook_is_an_error():
    class Renamed:
        @hookimpl(specname="expertrain_stepbegin")
        def on_step(self, step):
            pass

    with pytest.raises(
        PluginError,
        match="plugin 'renamed' implements on_step as hook expertrain_stepbegin.*'expertrain_step_begin'",
    ):
        PluginManager().register_object("renamed", Renamed())


def test_argument_the_hook_does_not_pass_is_an_error():
    class Wrong:
        @hookimpl
        def expertrain_step_begin(self, step, modle):
            pass

    with pytest.raises(PluginError) as info:
        PluginManager().register_object("wrong", Wrong())
    message = str(info.value)
    assert "plugin 'wrong'" in message and "expertrain_step_begin" in message and "'modle'" in message
    assert "step, model, optimizer, config" in message


def test_keyword_only_arguments_are_refused():
    # pluggy passes hook arguments by parameter name but never to keyword-only parameters: the call would fail later.
    class KwOnly:
        @hookimpl
        def expertrain_step_begin(self, *, step):
            pass

    with pytest.raises(PluginError, match="plugin 'kwonly'.*ordinary parameters"):
        PluginManager().register_object("kwonly", KwOnly())


def test_same_plugin_name_twice_is_refused():
    pm = PluginManager()
    pm.register_object("x", object())
    with pytest.raises(PluginError, match="'x' is already loaded"):
        pm.register_object("x", object())


# --- config sections ---------------------------------------------------------------------------------------------


@dataclass
class SectionA:
    value: int = option(1, doc="A value.", min=0)


def _sections_plugin(sections):
    class Plugin:
        @hookimpl
        def expertrain_config_sections(self):
            return sections

    return Plugin()


def test_config_sections_are_collected_per_plugin():
    pm = PluginManager()
    pm.register_object("p", _sections_plugin({"psec": SectionA}))
    assert pm.config_sections == {"psec": SectionA}
    assert pm.section_owner("psec") == "p"


def test_section_clashing_with_a_core_section_names_both():
    with pytest.raises(PluginError) as info:
        PluginManager().register_object("greedy", _sections_plugin({"optim": SectionA}))
    assert (
        "'optim'" in str(info.value)
        and "plugin 'greedy'" in str(info.value)
        and "core section" in str(info.value)
    )


def test_section_claimed_by_two_plugins_names_both():
    pm = PluginManager()
    pm.register_object("first", _sections_plugin({"shared": SectionA}))
    with pytest.raises(PluginError, match="'shared' is claimed by two plugins: 'first' and 'second'"):
        pm.register_object("second", _sections_plugin({"shared": SectionA}))


def test_section_must_be_a_documented_dataclass():
    with pytest.raises(PluginError, match="expected a dataclass"):
        PluginManager().register_object("p", _sections_plugin({"psec": dict}))

    @dataclass
    class Undocumented:
        value: int = 1

    with pytest.raises(PluginError, match=r"'psec.value' is not declared with framework.config.option"):
        PluginManager().register_object("p", _sections_plugin({"psec": Undocumented}))


# --- components --------------------------------------------------------------------------------------------------


def _components_plugin(name):
    class Plugin:
        @hookimpl
        def expertrain_register_components(self, registry):
            registry.register("router", name, lambda: name)

    return Plugin()


def test_components_are_registered_under_the_plugin_name():
    pm = PluginManager()
    pm.register_object("routers", _components_plugin("fancy"))
    assert pm.registry.get("router", "fancy").owner == "routers"
    assert pm.registry.current_owner == "core"  # restored afterwards


def test_component_registered_by_two_plugins_names_both():
    pm = PluginManager()
    pm.register_object("one", _components_plugin("fancy"))
    with pytest.raises(PluginHookError) as info:
        pm.register_object("two", _components_plugin("fancy"))
    message = str(info.value)
    assert "plugin 'two' failed in hook expertrain_register_components" in message
    assert "by plugin 'one' and by plugin 'two'" in message


# --- built-in plugins the core enables ---------------------------------------------------------------------------

ORDERED = """
from framework.hooks import hookimpl

@hookimpl
def expertrain_transform_model(model, config):
    model.append("{name}")
"""


def test_plugins_run_in_the_order_of_the_plugins_list(make_dist):
    for name in ("first", "second"):
        make_dist(f"pkg-{name}", {name: f"loadtest_{name}"}, {f"loadtest_{name}": ORDERED.format(name=name)})
    pm = PluginManager()
    pm.load(["second", "first"])
    order: list[str] = []
    pm.hook.expertrain_transform_model(model=order, config=None)
    assert order == ["second", "first"]  # the order of 'plugins', not pluggy's last-registered-first
    assert pm.plugin_names == ["second", "first"]
    assert pm.enabled_reasons == {"second": "listed in 'plugins'", "first": "listed in 'plugins'"}
    assert (
        list(pm.call_per_plugin("expertrain_transform_model", model=[], config=None)) == []
    )  # all return None
