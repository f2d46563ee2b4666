"""The plugin manager: loads the plugins a job names, checks them, and calls their hooks with clear errors.

It wraps ``pluggy.PluginManager("expertrain")``. What it adds to pluggy:

* plugins are loaded **only** when the job names them (from the entry-point group ``expertrain.plugins``); the
  core never imports or enables plugin code itself;
* start-up checks: unknown plugin names, misspelled hook implementations, hook arguments the hook does not pass,
  config sections claimed twice, component names registered twice — each an error naming the plugin;
* an exception inside any hook becomes a :class:`PluginHookError` naming the plugin and the hook (a
  :class:`~framework.config.ConfigError` stays a ``ConfigError``: it is the user's mistake, not the plugin's);
* helpers that merge the answers of collect-all hooks and refuse conflicts (a loss name returned twice, a parameter
  claimed by two optimizer groups, ...);
* hook-call tracing on every rank when ``EXPERTRAIN_TRACE_HOOKS=1``.

Plugins are called in *plugin order*: first the plugins the core enabled itself (in the order it enabled them), then
the plugins of ``plugins:`` in the order they are listed, then plugins registered in-process. Implementations marked
``tryfirst`` / ``trylast`` move to the front / back as usual in pluggy.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.metadata
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from framework.config.errors import ConfigError
from framework.config.job import TOP_LEVEL_KEYS
from framework.config.sections import CORE_SECTIONS
from framework.hooks import specs
from framework.hooks.errors import PluginError, PluginHookError, UnknownPluginError
from framework.hooks.markers import ENTRY_POINT_GROUP, PROJECT
from framework.hooks.registry import ComponentRegistry

TRACE_ENV = "EXPERTRAIN_TRACE_HOOKS"
"""Set to ``1`` to log every hook call (hook, plugins called, duration) to stderr on every rank."""

HOOK_PREFIX = PROJECT + "_"

log = logging.getLogger("expertrain.hooks")
trace_log = logging.getLogger("expertrain.hooks.trace")

_INSTALL_HINT = (
    "Install a plugin package with `pip install <package>` (it registers its plugins under the entry-point group "
    f"'{ENTRY_POINT_GROUP}'), or fix the name; `expertrain plugins` lists what is installed"
)


_HOOKS = tuple(name for name, obj in vars(specs).items() if callable(obj) and hasattr(obj, PROJECT + "_spec"))


def hook_names() -> list[str]:
    """Every hook of the extension surface, in lifecycle order (the order of ``framework/hooks/specs.py``)."""
    return list(_HOOKS)


# --- installed plugins (entry points) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstalledPlugin:
    """One entry point of the group ``expertrain.plugins``."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: importlib.metadata.EntryPoint = field(compare=False, repr=False)

    @property
    def package(self) -> str:
        return f"{self.distribution} {self.version}".strip() or "(unknown distribution)"


def installed_entries() -> list[InstalledPlugin]:
    """Every entry point of ``expertrain.plugins`` visible on ``sys.path``, sorted by name (duplicates kept)."""
    out = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else ""
        version = dist.version if dist is not None else ""
        out.append(InstalledPlugin(ep.name, ep.value, dist_name or "", version or "", ep))
    return sorted(out, key=lambda p: (p.name, p.distribution))


def installed_plugins() -> dict[str, str]:
    """``{plugin name: entry point value}`` of every installed plugin (value: ``module`` or ``module:object``)."""
    return {p.name: p.value for p in installed_entries()}


def _entries_by_name() -> dict[str, list[InstalledPlugin]]:
    by_name: dict[str, list[InstalledPlugin]] = {}
    for entry in installed_entries():
        by_name.setdefault(entry.name, []).append(entry)
    return by_name


def _installed_text(by_name: Mapping[str, Any]) -> str:
    return ", ".join(sorted(by_name)) or "none"


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# --- pluggy with expertrain's rules -----------------------------------------------------------------------------


class _Pluggy(pluggy.PluginManager):
    """pluggy, also taking undecorated functions named ``expertrain_*`` as hook implementations (as pytest does).

    Without this a plugin that forgot ``@hookimpl`` would be silently ignored; with it, a misspelled undecorated
    function is caught by the unknown-hook check like a decorated one.
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None or not name.startswith(HOOK_PREFIX):
            return opts
        static = inspect.getattr_static(plugin, name, None)
        if inspect.isfunction(static) or isinstance(static, (staticmethod, classmethod)):
            return {}
        return None


def _plugin_error_suffix(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _translate(exc: Exception, plugin: str, hook: str) -> Exception:
    """The exception a plugin's failure becomes: PluginHookError, or a ConfigError that names the plugin."""
    if isinstance(exc, PluginHookError) or getattr(exc, "_expertrain_plugin", None):
        return exc  # already attributed (an inner implementation, seen again by a wrapper)
    if isinstance(exc, ConfigError):
        expected = f"{exc.expected} (reported by plugin '{plugin}' in {hook})"
        try:
            new: Exception = type(exc)(exc.key, exc.value, expected)
        except Exception:
            new = ConfigError(exc.key, exc.value, expected)
        new._expertrain_plugin = plugin  # type: ignore[attr-defined]
        return new
    return PluginHookError(plugin, hook, exc)


def _guard(function: Callable[..., Any], plugin: str, hook: str, generator: bool) -> Callable[..., Any]:
    """Wrap one hook implementation so that its exceptions name the plugin and the hook."""
    if generator:  # a wrapper implementation: pluggy drives the generator, so guard its whole life

        @functools.wraps(function)
        def guarded_gen(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from function(*args, **kwargs))
            except Exception as exc:
                new = _translate(exc, plugin, hook)
                if new is exc:
                    raise
                raise new from exc

        guarded_gen._expertrain_guarded = True  # type: ignore[attr-defined]
        return guarded_gen

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            new = _translate(exc, plugin, hook)
            if new is exc:
                raise
            raise new from exc

    guarded._expertrain_guarded = True  # type: ignore[attr-defined]
    return guarded


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of the call."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _trace_enabled_by_env() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --- the manager ------------------------------------------------------------------------------------------------


class PluginManager:
    """Loads, checks and calls expertrain plugins. One per process (every rank has its own)."""

    def __init__(self, registry: ComponentRegistry | None = None, *, trace: bool | None = None) -> None:
        """``registry``: where plugins register components (a fresh one by default).
        ``trace``: log every hook call; ``None`` reads the environment variable ``EXPERTRAIN_TRACE_HOOKS``."""
        self._pm = _Pluggy(PROJECT)
        self._pm.add_hookspecs(specs)
        self.registry = registry if registry is not None else ComponentRegistry()
        self._plugins: dict[str, Any] = {}
        self._listed: list[str] = []  # named in the job (load) or registered in-process (register_object)
        self._reasons: dict[str, str] = {}
        self._sections: dict[str, type] = {}
        self._section_owner: dict[str, str] = {}
        self._trace_starts: list[float] = []
        self._undo_trace: Callable[[], None] | None = None
        if trace if trace is not None else _trace_enabled_by_env():
            self.enable_trace()

    # --- loading ----------------------------------------------------------------------------------------------

    def load(self, names: list[str]) -> None:
        """Load exactly the plugins ``names`` (the job's ``plugins`` list) from the entry points, in that order.

        Raises :class:`UnknownPluginError` (a ConfigError) for a name that is not installed and
        :class:`PluginError` for a plugin that fails to import or breaks a rule.
        """
        names = list(names)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise PluginError(f"plugin '{name}' is named twice in 'plugins'; name each plugin once")
            seen.add(name)
            if name in self._plugins:
                raise PluginError(f"plugin '{name}' is already loaded ({self._reasons[name]})")
        by_name = _entries_by_name()
        for name in names:
            if name not in by_name:
                hint = _did_you_mean(name, by_name)
                raise UnknownPluginError(
                    "plugins",
                    name,
                    f"expected an installed plugin (installed: {_installed_text(by_name)}){hint}"
                    f"{' ' if hint else '. '}{_INSTALL_HINT}",
                )
        loaded = [(name, self._load_entry(name, by_name[name])) for name in names]
        self._add(loaded, reason="listed in 'plugins'")

    def register_object(self, name: str, obj: Any) -> None:
        """Register an in-process plugin (a module or an object with hook methods) under ``name``.

        Same checks as :meth:`load`: used by tests and by programs that embed expertrain.
        """
        if not isinstance(name, str) or not name:
            raise PluginError(f"a plugin needs a non-empty name, got {name!r}")
        if name in self._plugins:
            raise PluginError(f"plugin '{name}' is already loaded ({self._reasons[name]})")
        if inspect.isclass(obj):
            raise PluginError(f"plugin '{name}': register an instance of {obj.__name__}, not the class")
        self._add([(name, obj)], reason="registered in-process")

    def _load_entry(self, name: str, entries: list[InstalledPlugin]) -> Any:
        if len(entries) > 1:
            sources = " and ".join(f"'{e.value}' from {e.package}" for e in entries)
            raise PluginError(
                f"plugin name '{name}' is registered twice: {sources}; uninstall one of the packages"
            )
        entry = entries[0]
        try:
            obj = entry.entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin '{name}' (entry point '{entry.value}' of {entry.package}) failed to import: "
                f"{_plugin_error_suffix(exc)}"
            ) from exc
        if inspect.isclass(obj):
            try:
                obj = obj()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{name}': creating {entry.value}() failed: {_plugin_error_suffix(exc)}"
                ) from exc
        return obj

    def _add(self, items: list[tuple[str, Any]], reason: str) -> None:
        for name, obj in items:
            self._check_impls(name, obj)
        for name, obj in items:
            self._plugins[name] = obj
            self._listed.append(name)
            self._reasons[name] = reason
        self._reregister()
        self._check_pending()
        for name, _ in items:
            self._collect_sections(name)
        for name, _ in items:
            self._register_components(name)

    def _check_impls(self, name: str, obj: Any) -> None:
        """Unknown hooks and arguments a hook does not pass, with the plugin and function named."""
        known = set(_HOOKS)
        for attr in dir(obj):
            opts = self._pm.parse_hookimpl_opts(obj, attr)
            if opts is None:
                continue
            hook = opts.get("specname") or attr
            if hook not in known:
                if opts.get("optionalhook"):
                    continue
                as_hook = f" as hook {hook}" if hook != attr else ""
                raise PluginError(
                    f"plugin '{name}' implements {attr}{as_hook}, which is not an expertrain hook"
                    f"{_did_you_mean(hook, known)} (hooks are listed in docs/hooks.md)"
                )
            function = inspect.getattr_static(obj, attr)
            function = getattr(function, "__func__", function)
            params = list(inspect.signature(function).parameters.values())
            if params and params[0].name in ("self", "cls") and not inspect.ismodule(obj):
                params = params[1:]
            spec_args = list(inspect.signature(getattr(specs, hook)).parameters)
            for p in params:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
                    raise PluginError(
                        f"plugin '{name}': {attr} declares {p} but hooks pass only named, ordinary parameters; "
                        f"declare any of: {', '.join(spec_args) or '(none)'}"
                    )
                if p.name not in spec_args:
                    raise PluginError(
                        f"plugin '{name}': {attr} takes argument '{p.name}', which the hook {hook} does not pass; "
                        f"it passes: {', '.join(spec_args) or '(nothing)'}"
                    )

    def _reregister(self) -> None:
        """(Re)register every plugin so that pluggy's call order is plugin order (pluggy calls last-in first)."""
        for name in list(self._plugins):
            if self._pm.get_plugin(name) is not None:
                self._pm.unregister(name=name)
        for name in reversed(self.plugin_names):
            obj = self._plugins[name]
            try:
                self._pm.register(obj, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(
                    f"plugin '{name}' is not a valid expertrain plugin: {str(exc).splitlines()[-1]}"
                ) from exc
            except ValueError as exc:  # the same object under two names
                raise PluginError(
                    f"plugin '{name}' cannot be registered: {str(exc).splitlines()[0]}"
                ) from exc
            for caller in self._pm.get_hookcallers(obj) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is obj and not getattr(impl.function, "_expertrain_guarded", False):
                        generator = bool(impl.wrapper or impl.hookwrapper)
                        impl.function = _guard(impl.function, name, caller.name, generator)  # type: ignore[misc]

    def _check_pending(self) -> None:
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = self._pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(f"plugin '{plugin}': {exc} (hooks are listed in docs/hooks.md)") from exc

    def _collect_sections(self, name: str) -> None:
        result = self.call_plugin(name, "expertrain_config_sections")
        if result is None:
            return
        if not isinstance(result, Mapping):
            raise PluginError(
                f"plugin '{name}' returned {type(result).__name__} from expertrain_config_sections; "
                "expected a mapping {section name: dataclass} or None"
            )
        for section, cls in result.items():
            if not isinstance(section, str) or not section.isidentifier():
                raise PluginError(
                    f"plugin '{name}' declares config section {section!r}; expected an identifier"
                )
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise PluginError(
                    f"plugin '{name}' declares config section '{section}' as {cls!r}; expected a dataclass "
                    "whose fields are declared with framework.config.option"
                )
            for f in dataclasses.fields(cls):
                if "doc" not in f.metadata:
                    raise PluginError(
                        f"plugin '{name}': field '{section}.{f.name}' is not declared with "
                        "framework.config.option(default, doc=...); every config key needs its documentation"
                    )
            if section in CORE_SECTIONS or section in TOP_LEVEL_KEYS:
                raise PluginError(
                    f"config section '{section}' of plugin '{name}' clashes with the core section '{section}'; "
                    "the plugin must use another section name"
                )
            if section in self._section_owner:
                raise PluginError(
                    f"config section '{section}' is claimed by two plugins: '{self._section_owner[section]}' and "
                    f"'{name}'; enable only one of them, or rename the section in one"
                )
            self._sections[section] = cls
            self._section_owner[section] = name

    def _register_components(self, name: str) -> None:
        if "expertrain_register_components" not in self.hooks_implemented(name):
            return
        previous = self.registry.current_owner
        self.registry.current_owner = name
        try:
            self.call_plugin(name, "expertrain_register_components", registry=self.registry)
        finally:
            self.registry.current_owner = previous

    # --- what is loaded ---------------------------------------------------------------------------------------

    @property
    def hook(self) -> Any:
        """pluggy's hook relay: ``pm.hook.expertrain_step_begin(step=..., model=..., optimizer=..., config=...)``."""
        return self._pm.hook

    @property
    def plugin_names(self) -> list[str]:
        """Enabled plugins in plugin order (as listed, then those registered in-process)."""
        return list(self._listed)

    @property
    def enabled_reasons(self) -> dict[str, str]:
        """``{plugin: why it is enabled}`` ("listed in 'plugins'" or "registered in-process")."""
        return {name: self._reasons[name] for name in self.plugin_names}

    @property
    def config_sections(self) -> dict[str, type]:
        """``{section name: dataclass}`` of every enabled plugin, for :func:`framework.config.resolve`."""
        return dict(self._sections)

    def section_owner(self, section: str) -> str:
        """The plugin that declared config section ``section``."""
        return self._section_owner[section]

    def get_plugin(self, name: str) -> Any:
        """The registered object (module or instance) of plugin ``name``."""
        try:
            return self._plugins[name]
        except KeyError:
            raise PluginError(
                f"plugin '{name}' is not enabled (enabled: {_installed_text(self._plugins)})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def hooks_implemented(self, plugin: str) -> list[str]:
        """The hooks plugin ``plugin`` implements, in lifecycle order."""
        obj = self.get_plugin(plugin)
        names = {caller.name for caller in self._pm.get_hookcallers(obj) or []}
        return sorted(names, key=lambda n: (_HOOKS.index(n) if n in _HOOKS else len(_HOOKS), n))

    def hook_argument_takers(self, hook_name: str, argument: str) -> list[str]:
        """The plugins whose implementation of ``hook_name`` declares ``argument``, in plugin order.

        Declaring an argument is how a plugin asks for something costly: e.g. ``expertrain_extra_losses`` taking
        ``logits`` makes the trainer compute the LM head at every position (see the hook specifications). An
        ``argument`` the hook does not pass is a ``ValueError``.
        """
        caller = self._caller(hook_name)
        passed = list(inspect.signature(getattr(specs, hook_name)).parameters)
        if argument not in passed:
            raise ValueError(
                f"hook {hook_name} passes no argument {argument!r}; it passes: {', '.join(passed)}"
            )
        takers = {impl.plugin_name for impl in caller.get_hookimpls() if argument in impl.argnames}
        return [name for name in self.plugin_names if name in takers]

    # --- calling ----------------------------------------------------------------------------------------------

    def _caller(self, hook_name: str) -> Any:
        if hook_name not in _HOOKS:
            raise ValueError(f"{hook_name!r} is not an expertrain hook{_did_you_mean(hook_name, _HOOKS)}")
        return getattr(self._pm.hook, hook_name)

    def call_plugin(self, plugin: str, hook_name: str, **kwargs: Any) -> Any:
        """Call hook ``hook_name`` of one plugin only; its result, or ``None`` if it does not implement the hook."""
        self._caller(hook_name)
        self.get_plugin(plugin)  # an unknown plugin is an error, not a silent None
        others = [o for n, o in self._plugins.items() if n != plugin]
        results = self._pm.subset_hook_caller(hook_name, others)(**kwargs)
        return results[0] if results else None

    def call_per_plugin(self, hook_name: str, **kwargs: Any) -> dict[str, Any]:
        """Call ``hook_name`` plugin by plugin: ``{plugin: result}`` in call order, plugins returning ``None`` left out."""
        caller = self._caller(hook_name)
        impls = [i for i in caller.get_hookimpls() if not (i.wrapper or i.hookwrapper)]
        out: dict[str, Any] = {}
        for impl in reversed(impls):  # pluggy's call order
            if impl.plugin_name in out:
                continue
            result = self.call_plugin(impl.plugin_name, hook_name, **kwargs)
            if result is not None:
                out[impl.plugin_name] = result
        return out

    def _collect_mapping(
        self, hook_name: str, what: str, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, str]]:
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for plugin, result in self.call_per_plugin(hook_name, **kwargs).items():
            if not isinstance(result, Mapping):
                raise PluginError(
                    f"plugin '{plugin}' returned {type(result).__name__} from {hook_name}; expected a mapping "
                    f"{{{what}: value}} or None"
                )
            for key, value in result.items():
                if not isinstance(key, str):
                    raise PluginError(
                        f"plugin '{plugin}' returned {what} {key!r} from {hook_name}; expected a string"
                    )
                if key in owner:
                    raise PluginError(
                        f"{what} '{key}' is returned by two plugins, '{owner[key]}' and '{plugin}' ({hook_name}); "
                        "each name must come from one plugin"
                    )
                merged[key] = value
                owner[key] = plugin
        return merged, owner

    def collect_mapping(self, hook_name: str, what: str = "name", **kwargs: Any) -> dict[str, Any]:
        """Merge the mappings that plugins return from ``hook_name``; a key returned by two plugins is an error.

        ``what`` names the keys in that error ("loss name", "metric", ...).
        """
        return self._collect_mapping(hook_name, what, **kwargs)[0]

    def merge_extra_losses(self, model: Any, input_ids: Any, logits: Any, config: Any) -> dict[str, Any]:
        """``expertrain_extra_losses`` of every plugin merged into ``{name: scalar tensor}``.

        A name returned by two plugins, or a value that is not a scalar tensor, is a :class:`PluginError`.
        """
        losses, owner = self._collect_mapping(
            "expertrain_extra_losses",
            "loss name",
            model=model,
            input_ids=input_ids,
            logits=logits,
            config=config,
        )
        for name, value in losses.items():
            if getattr(value, "ndim", None) != 0 or not hasattr(value, "backward"):
                raise PluginError(
                    f"plugin '{owner[name]}' returned loss '{name}' as {type(value).__name__}"
                    f"{' of shape ' + str(tuple(value.shape)) if hasattr(value, 'shape') else ''}; expected a scalar tensor"
                )
        return losses

    def merge_metrics(self, step: int, model: Any, config: Any) -> dict[str, float]:
        """``expertrain_metrics`` of every plugin merged into ``{name: float}`` (0-d tensors become floats).

        A name returned by two plugins, or a value that is not a number, is a :class:`PluginError`.
        """
        metrics, owner = self._collect_mapping(
            "expertrain_metrics", "metric", step=step, model=model, config=config
        )
        out: dict[str, float] = {}
        for name, value in metrics.items():
            if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PluginError(
                    f"plugin '{owner[name]}' returned metric '{name}' as {type(value).__name__}; expected a number"
                )
            out[name] = float(value)
        return out

    def transforms_needing_weights(self) -> list[str]:
        """Plugins whose ``expertrain_transform_model`` needs the model's real weights: those that implement it
        without ``expertrain_init_weights`` (see the hook specifications). Empty when the model can be transformed
        and parallelised on the meta device."""
        return [
            name
            for name in self.plugin_names
            if "expertrain_transform_model" in (hooks := self.hooks_implemented(name))
            and "expertrain_init_weights" not in hooks
        ]

    def trainable_names(self, model: Any, config: Any) -> set[str]:
        """The names of the parameters to train, from ``expertrain_trainable_parameters``.

        If no plugin has an opinion (all return ``None``), every parameter. Otherwise the union of the plugins' lists.
        A name that is not a parameter of ``model`` is an error naming the plugin; so is an empty union.
        """
        all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        known = set(all_names)
        answers = self.call_per_plugin("expertrain_trainable_parameters", model=model, config=config)
        if not answers:
            return set(known)
        union: set[str] = set()
        for plugin, names in answers.items():
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise PluginError(
                    f"plugin '{plugin}' returned {type(names).__name__} from expertrain_trainable_parameters; "
                    "expected a list of parameter names or None"
                )
            names = list(names)
            bad = [n for n in names if not isinstance(n, str) or n not in known]
            if bad:
                shown = ", ".join(repr(n) for n in bad[:5]) + (
                    f" and {len(bad) - 5} more" if len(bad) > 5 else ""
                )
                raise PluginError(
                    f"plugin '{plugin}' asked to train parameters that the model does not have: {shown} "
                    "(names are those of model.named_parameters())"
                )
            union.update(names)
        if not union:
            raise PluginError(
                f"no parameter would be trained: plugin(s) {', '.join(repr(p) for p in answers)} returned empty "
                "trainable-parameter lists (check the plugin's target settings)"
            )
        return union

    def param_groups(self, model: Any, config: Any) -> list[dict[str, Any]]:
        """The optimizer param groups plugins claim, from ``expertrain_optimizer_param_groups``, in plugin order.

        Each returned group is a copy with ``params`` as a list and ``plugin`` set to the plugin's name. A parameter
        claimed twice (by two plugins or two groups), one that is not a parameter of ``model`` or one that is frozen
        is a :class:`PluginError`. Unclaimed trainable parameters are left to the core's default groups.
        """
        param_name = {}
        for name, p in model.named_parameters():
            param_name.setdefault(id(p), name)
        claimed: dict[int, str] = {}
        groups: list[dict[str, Any]] = []
        for plugin, answer in self.call_per_plugin(
            "expertrain_optimizer_param_groups", model=model, config=config
        ).items():
            if isinstance(answer, Mapping) or not isinstance(answer, Iterable):
                raise PluginError(
                    f"plugin '{plugin}' returned {type(answer).__name__} from expertrain_optimizer_param_groups; "
                    "expected a list of param-group dicts or None"
                )
            for i, group in enumerate(answer):
                if not isinstance(group, Mapping) or "params" not in group:
                    raise PluginError(
                        f"plugin '{plugin}' returned optimizer group {i} without 'params'; expected a dict like "
                        "{'params': [...], 'lr': ...}"
                    )
                params = list(group["params"])
                for p in params:
                    name = param_name.get(id(p))
                    if name is None:
                        raise PluginError(
                            f"plugin '{plugin}' put a tensor that is not a parameter of the model into optimizer "
                            f"group {i}"
                        )
                    if not getattr(p, "requires_grad", False):
                        raise PluginError(
                            f"plugin '{plugin}' put frozen parameter '{name}' into optimizer group {i}; claim only "
                            "trainable parameters"
                        )
                    if id(p) in claimed:
                        first = claimed[id(p)]
                        who = (
                            f"twice by plugin '{plugin}'"
                            if first == plugin
                            else f"by plugins '{first}' and '{plugin}'"
                        )
                        raise PluginError(
                            f"parameter '{name}' is claimed by two optimizer groups ({who}); a parameter may be in "
                            "one group only"
                        )
                    claimed[id(p)] = plugin
                groups.append({**group, "params": params, "plugin": plugin})
        return groups

    def plugin_state_dicts(self, model: Any, config: Any) -> dict[str, dict[str, Any]]:
        """``{plugin: state}`` from ``expertrain_state_dict`` (plugins returning ``None`` left out), for checkpoints."""
        states = self.call_per_plugin("expertrain_state_dict", model=model, config=config)
        for plugin, state in states.items():
            if not isinstance(state, Mapping):
                raise PluginError(
                    f"plugin '{plugin}' returned {type(state).__name__} from expertrain_state_dict; expected a "
                    "mapping or None"
                )
        return {plugin: dict(state) for plugin, state in states.items()}

    def load_plugin_state_dicts(
        self, states: Mapping[str, Mapping[str, Any]], model: Any, config: Any, strict: bool = True
    ) -> list[str]:
        """Give each plugin back the state it saved (``expertrain_load_state_dict``). Returns the plugins restored.

        With ``strict``, state of a plugin that is not enabled now is an error; otherwise it is skipped.
        """
        restored = []
        for plugin, state in states.items():
            if plugin not in self._plugins:
                if strict:
                    raise PluginError(
                        f"the checkpoint holds state of plugin '{plugin}', which this job does not enable; add "
                        f"'{plugin}' to 'plugins' to resume it, or start a new run directory"
                    )
                log.warning("checkpoint state of plugin '%s' ignored: the plugin is not enabled", plugin)
                continue
            if "expertrain_load_state_dict" not in self.hooks_implemented(plugin):
                raise PluginError(
                    f"plugin '{plugin}' saved state in the checkpoint but does not implement "
                    "expertrain_load_state_dict to restore it"
                )
            self.call_plugin(
                plugin, "expertrain_load_state_dict", model=model, state=dict(state), config=config
            )
            restored.append(plugin)
        return restored

    # --- tracing ----------------------------------------------------------------------------------------------

    def enable_trace(self) -> None:
        """Log every hook call (hook, plugins in call order, duration) with the rank, on logger ``expertrain.hooks.trace``."""
        if self._undo_trace is not None:
            return
        if not trace_log.handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            trace_log.addHandler(handler)
            trace_log.propagate = False
        trace_log.setLevel(logging.INFO)
        self._undo_trace = self._pm.add_hookcall_monitoring(self._trace_before, self._trace_after)

    def disable_trace(self) -> None:
        if self._undo_trace is not None:
            self._undo_trace()
            self._undo_trace = None

    def _trace_before(self, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        self._trace_starts.append(time.perf_counter())

    def _trace_after(self, outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        elapsed_ms = (time.perf_counter() - self._trace_starts.pop()) * 1e3
        plugins = ", ".join(impl.plugin_name for impl in reversed(hook_impls)) or "no plugin"
        failed = outcome.exception
        status = f" raised {type(failed).__name__}" if failed is not None else ""
        trace_log.info("[rank %d] hook %s [%s] %.3f ms%s", _rank(), hook_name, plugins, elapsed_ms, status)
