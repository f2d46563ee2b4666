"""The packages of ``framework/`` import only from the floors below them (docs/architecture.md, "Layers, from the
ground up"): every import statement of every module, module-level or inside a function, is read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FLOORS = {
    "errors": 0,
    "comm": 0,
    "config": 1,
    "observe": 1,
    "hooks": 2,
    "data": 2,
    "models": 3,
    "models.moe": 3,
    "parallel": 4,
    "engines": 4,
    "checkpoint": 5,
    "interop": 5,
    "inference": 6,
    "train": 7,
    "plan": 8,
    "cli": 9,
}
"""The floor of each package (docs/architecture.md)."""

SIDEWAYS = {
    ("models", "models.moe"),
    ("models.moe", "models"),
    ("engines", "parallel"),
    ("checkpoint", "interop"),
    ("interop", "checkpoint"),
}
"""Packages on one floor that may import each other (in the direction given)."""

UPWARD = {
    ("framework/checkpoint/export.py", "framework.train.assembly"),
    ("framework/checkpoint/partial.py", "framework.train.assembly"),
    ("framework/interop/hf/folders.py", "framework.train.assembly"),
}
"""The known upward edges (lazy imports of the model assembly; docs/architecture.md says why)."""


def package_of(module: str) -> str | None:
    """The package of ``framework.<...>`` (``models.moe`` apart from ``models``); ``None`` outside framework."""
    parts = module.split(".")
    if parts[0] != "framework" or len(parts) < 2:
        return None
    if parts[1] == "models" and len(parts) > 2 and parts[2] == "moe":
        return "models.moe"
    return parts[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, node.lineno)]
            out += [
                (f"{node.module}.{alias.name}", node.lineno)
                for alias in node.names
                if node.module == "framework"
            ]
    return out


def test_every_framework_package_has_a_floor() -> None:
    packages = {
        package_of(".".join(p.relative_to(ROOT).with_suffix("").parts))
        for p in (ROOT / "framework").rglob("*.py")
    }
    assert packages - {"__init__"} <= set(FLOORS), sorted(packages - {"__init__"} - set(FLOORS))


def test_no_framework_module_imports_from_a_floor_above_it() -> None:
    wrong = []
    for path in sorted((ROOT / "framework").rglob("*.py")):
        relative = path.relative_to(ROOT)
        me = package_of(".".join(relative.with_suffix("").parts))
        if me not in FLOORS:
            continue
        for module, line in imports_of(path):
            other = package_of(module)
            if other is None or other == me or other not in FLOORS:
                continue
            allowed = FLOORS[other] < FLOORS[me] or (me, other) in SIDEWAYS
            upward_known = (relative.as_posix(), module) in UPWARD
            if not allowed and not upward_known:
                wrong.append(
                    f"{relative}:{line} ({me}, floor {FLOORS[me]}) imports {module} (floor {FLOORS[other]})"
                )
    assert not wrong, "imports from a floor above:\n" + "\n".join(wrong)
