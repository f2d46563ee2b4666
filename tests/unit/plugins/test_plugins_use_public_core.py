"""No plugin calls, reads or overrides an underscore member of a core class (``framework/``), nor imports an
underscore name from a core module: plugins extend the core through its public, documented extension points only
(docs/writing_plugins.md, docs/moe.md "Writing an MoE variant").

The scan is static (``ast``): it knows the underscore members every class under ``framework/`` defines (methods and
``self._x`` attributes) and flags, in every module under ``plugins/``,

- a method or ``del self.x`` in a class that subclasses a core class, where the name is one of the core class's
  underscore members (an override) or an attribute the core class sets (a deletion, e.g. ``del self.router``);
- ``obj._name`` / ``getattr(obj, "_name")`` where ``_name`` is a core class's underscore member that the plugin module
  does not define itself (a plugin's own private members may share a name with a core one);
- ``from framework... import _name`` and ``module._name`` on a core module bound in the plugin;
- ``from framework.models.moe.<submodule> import ...``: the MoE core's public module is ``framework.models.moe``.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class CoreClass:
    """What a class under ``framework/`` defines: its underscore members and every ``self.x`` it assigns."""

    private: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)


def _self_targets(node: ast.AST) -> list[str]:
    """Names ``x`` of ``self.x = ...`` / ``self.x: T = ...`` targets under ``node``."""
    names = []
    for sub in ast.walk(node):
        targets = (
            sub.targets
            if isinstance(sub, ast.Assign)
            else [sub.target]
            if isinstance(sub, ast.AnnAssign)
            else []
        )
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.append(t.attr)
    return names


@functools.cache
def _core_classes() -> dict[str, CoreClass]:
    classes: dict[str, CoreClass] = {}
    for path in sorted((REPO / "framework").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            core = classes.setdefault(node.name, CoreClass())
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(item.name):
                    core.private.add(item.name)
            for name in _self_targets(node):
                core.attributes.add(name)
                if _is_private(name):
                    core.private.add(name)
    return classes


def _core_module_aliases(tree: ast.Module) -> set[str]:
    """Names a plugin module binds to core modules (``from framework.comm import collectives as C`` -> ``C``)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("framework"):
            for alias in node.names:
                if (REPO / (node.module or "").replace(".", "/") / f"{alias.name}.py").is_file():
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("framework"):
                    aliases.add((alias.asname or alias.name).split(".")[0])
    return aliases


def _own_names(tree: ast.Module) -> set[str]:
    """Every function, class and ``self.x`` attribute the plugin module defines itself."""
    names = {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    return names | set(_self_targets(tree))


def _base_names(node: ast.ClassDef) -> list[str]:
    return [
        b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
        for b in node.bases
    ]


def violations(source: str, where: str, core: dict[str, CoreClass], core_private: set[str]) -> list[str]:
    """``file:line: what`` for every use of a core class's underscore member in plugin module ``source``, found at
    ``where`` (its path in the repository)."""
    tree = ast.parse(source)
    own, modules = _own_names(tree), _core_module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("framework.models.moe."):
            found.append(f"{where}:{node.lineno}: imports from {node.module} (use framework.models.moe)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("framework"):
            found += [
                f"{where}:{node.lineno}: imports {a.name} from {node.module}"
                for a in node.names
                if _is_private(a.name)
            ]
        elif isinstance(node, ast.ClassDef):
            for base in (b for b in _base_names(node) if b in core):
                for item in node.body:
                    if (
                        isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and item.name in core[base].private
                    ):
                        found.append(f"{where}:{item.lineno}: {node.name} overrides {base}.{item.name}")
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Delete):
                        for t in sub.targets:
                            if isinstance(t, ast.Attribute) and t.attr in core[base].attributes:
                                found.append(
                                    f"{where}:{sub.lineno}: {node.name} deletes {base}'s self.{t.attr}"
                                )
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            on_module = isinstance(node.value, ast.Name) and node.value.id in modules
            if on_module or (node.attr in core_private and node.attr not in own):
                found.append(f"{where}:{node.lineno}: uses {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and _names_a_core_private(node, core_private, own):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node.func)}(..., {node.args[1].value!r})")  # type: ignore[attr-defined]
    return found


def _names_a_core_private(call: ast.Call, core_private: set[str], own: set[str]) -> bool:
    """``getattr(obj, "_name")`` (or set/has/delattr) of a core underscore member the module does not define."""
    if not (isinstance(call.func, ast.Name) and call.func.id in ("getattr", "setattr", "hasattr", "delattr")):
        return False
    name = call.args[1] if len(call.args) >= 2 else None
    return isinstance(name, ast.Constant) and name.value in core_private and name.value not in own


def test_no_plugin_uses_an_underscore_member_of_a_core_class() -> None:
    core = _core_classes()
    core_private = set().union(*(c.private for c in core.values()))
    found = [
        v
        for path in sorted((REPO / "plugins").rglob("*.py"))
        for v in violations(
            path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix(), core, core_private
        )
    ]
    assert not found, "plugins must use the core's public extension points:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "from framework.models.moe import MoELayer\n"
            "class V(MoELayer):\n    def _record(self, routed, site):\n        pass\n",
            "plugins/probe.py:3: V overrides MoELayer._record",
        ),
        (
            "from framework.models.moe import MoELayer\n"
            "class V(MoELayer):\n    def __init__(self):\n        del self.router\n",
            "plugins/probe.py:4: V deletes MoELayer's self.router",
        ),
        (
            "def f(layer):\n    return layer._record_drops(1, 2, None)\n",
            "plugins/probe.py:2: uses layer._record_drops",
        ),
        (
            "def f(layer):\n    return getattr(layer, '_aux_losses')\n",
            "plugins/probe.py:2: getattr(..., '_aux_losses')",
        ),
        (
            "from framework.models.moe.layer import _in_backward\n",
            "plugins/probe.py:1: imports _in_backward from",
        ),
        (
            "from framework.models.moe.experts import GroupedExperts\n",
            "plugins/probe.py:1: imports from framework.models.moe.experts",
        ),
        (
            "from framework.comm import collectives as C\nC._anything()\n",
            "plugins/probe.py:2: uses C._anything",
        ),
    ],
    ids=["override", "del", "call", "getattr", "import", "submodule", "module"],
)
def test_the_scan_names_each_kind_of_use_with_file_and_line(source: str, expected: str) -> None:
    """Each pattern the scan exists for, in a probe module, is reported with its file and line; a plugin's own private
    member of the same name as a core one (``_record``) is not."""
    core = _core_classes()
    core_private = set().union(*(c.private for c in core.values()))
    found = violations(source, "plugins/probe.py", core, core_private)
    assert any(v.startswith(expected) for v in found), found
    own = "class Mine:\n    def _record(self):\n        pass\n\n    def run(self):\n        self._record()\n"
    assert violations(own, "plugins/probe.py", core, core_private) == []
