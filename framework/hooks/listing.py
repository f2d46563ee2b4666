"""The text of ``expertrain plugins [--config F]``: every installed plugin, what it provides, whether it is enabled."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from framework.hooks.errors import PluginError
from framework.hooks.manager import HOOK_PREFIX, InstalledPlugin, PluginManager, installed_entries
from framework.hooks.markers import ENTRY_POINT_GROUP
from framework.hooks.registry import COMPONENT_KINDS

_HOOKS_WIDTH = 60


@dataclass
class PluginInfo:
    """What one installed plugin provides, found by loading it into a throw-away manager."""

    entry: InstalledPlugin
    hooks: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    components: list[str] = field(default_factory=list)
    error: str = ""


def inspect_installed(entry: InstalledPlugin) -> PluginInfo:
    """Load ``entry`` alone and report its hooks, config sections and components (or why it cannot load)."""
    info = PluginInfo(entry)
    pm = PluginManager(trace=False)
    try:
        pm.load([entry.name])
    except PluginError as exc:
        info.error = str(exc)
        return info
    info.hooks = pm.hooks_implemented(entry.name)
    info.sections = sorted(pm.config_sections)
    info.components = [f"{kind}:{name}" for kind in COMPONENT_KINDS for name in pm.registry.names(kind)]
    return info


def _table(header: list[str], rows: list[list[list[str]]]) -> list[str]:
    """Rows of cells, each cell a list of lines; columns padded to their widest line."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max([widths[i], *(len(line) for line in cell)])

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    for row in rows:
        height = max(len(cell) for cell in row)
        for k in range(height):
            lines.append(fmt([cell[k] if k < len(cell) else "" for cell in row]))
    return lines


def describe_plugins(enabled: list[str]) -> str:
    """A readable table of every installed plugin: enabled by the config or not, package, sections, hooks.

    ``enabled`` is the config's ``plugins`` list (empty without ``--config``). Names listed but not installed are
    reported under the table.
    """
    entries = installed_entries()
    enabled_set = set(enabled)
    out = [f"Installed expertrain plugins (entry-point group '{ENTRY_POINT_GROUP}'):", ""]
    if not entries:
        out.append("  (none installed)")
    else:
        rows = []
        for entry in entries:
            info = inspect_installed(entry)
            if info.error:
                provides = textwrap.wrap("cannot load: " + info.error, _HOOKS_WIDTH)
            else:
                hooks = ", ".join(h.removeprefix(HOOK_PREFIX) for h in info.hooks) or "(none)"
                provides = textwrap.wrap(hooks, _HOOKS_WIDTH)
                if info.components:
                    provides += textwrap.wrap("components: " + ", ".join(info.components), _HOOKS_WIDTH)
            rows.append(
                [
                    [entry.name],
                    ["yes" if entry.name in enabled_set else "no"],
                    [entry.package],
                    info.sections or ["-"],
                    provides,
                ]
            )
        out += _table(["plugin", "enabled", "package", "sections", "hooks"], rows)
    installed = {e.name for e in entries}
    missing = [name for name in enabled if name not in installed]
    out.append("")
    if missing:
        out.append(
            "Enabled in the config but NOT installed: "
            + ", ".join(missing)
            + " (install the package that provides "
            "it, or remove it from 'plugins')"
        )
    out.append(f"Hook names are shown without the '{HOOK_PREFIX}' prefix (docs/hooks.md).")
    out.append(
        "Enable a plugin in a job file with `plugins: [name]`; docs/writing_plugins.md shows how to write one."
    )
    return "\n".join(out) + "\n"
