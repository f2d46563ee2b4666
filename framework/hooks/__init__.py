"""The extension surface of expertrain: hook specs, the plugin manager and the component registry.

A plugin author needs only :data:`hookimpl` (and :func:`framework.config.option` for a config section)::

    from framework.hooks import hookimpl

    @hookimpl
    def expertrain_metrics(step, model, config):
        return {"myplugin/step": step}

See ``docs/hooks.md`` for every hook and ``docs/writing_plugins.md`` for a complete plugin.
"""

from framework.hooks.errors import PluginError, PluginHookError, UnknownPluginError
from framework.hooks.listing import describe_plugins
from framework.hooks.manager import (
    TRACE_ENV,
    InstalledPlugin,
    PluginManager,
    hook_names,
    installed_entries,
    installed_plugins,
)
from framework.hooks.markers import ENTRY_POINT_GROUP, PROJECT, hookimpl, hookspec
from framework.hooks.registry import COMPONENT_KINDS, Component, ComponentError, ComponentRegistry

__all__ = [
    "COMPONENT_KINDS",
    "ENTRY_POINT_GROUP",
    "PROJECT",
    "TRACE_ENV",
    "Component",
    "ComponentError",
    "ComponentRegistry",
    "InstalledPlugin",
    "PluginError",
    "PluginHookError",
    "PluginManager",
    "UnknownPluginError",
    "describe_plugins",
    "hook_names",
    "hookimpl",
    "hookspec",
    "installed_entries",
    "installed_plugins",
]
