"""Errors of the plugin system. Each message is one line naming the plugin and what to do."""

from __future__ import annotations

from framework.config.errors import ConfigError


class PluginError(Exception):
    """A plugin cannot be loaded, or broke a rule of the hook surface (a clash, an unknown name, a bad return)."""


class UnknownPluginError(PluginError, ConfigError):
    """A plugin named in ``plugins`` is not installed. Also a :class:`ConfigError` (key ``plugins``): a user mistake."""


class PluginHookError(PluginError):
    """A plugin raised inside a hook. The original exception is chained (``__cause__``) and kept in ``original``.

    Message: ``plugin 'x' failed in hook expertrain_step_begin: ValueError: ...``.
    """

    def __init__(self, plugin: str, hook: str, original: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.original = original
        super().__init__(f"plugin '{plugin}' failed in hook {hook}: {type(original).__name__}: {original}")
