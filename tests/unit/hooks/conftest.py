"""Fixtures for the plugin-system tests: installable fake distributions, a tiny model, a real job config."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.hooks.support import TinyModel


@pytest.fixture
def model() -> TinyModel:
    return TinyModel()


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Install a fake distribution on ``sys.path`` (a ``*.dist-info`` with entry points), without pip.

    ``make_dist("dist-name", {"plugin": "module:obj"}, {"module": "source"})``. Modules are removed from
    ``sys.modules`` after the test, so each test imports its own.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(dist: str, entry_points: dict[str, str], files: dict[str, str], version: str = "0.1.0") -> Path:
        for module, source in files.items():
            path = site / (module.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source), encoding="utf-8")
            modules.append(module)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
        )
        lines = ["[expertrain.plugins]", *(f"{name} = {value}" for name, value in entry_points.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        importlib.invalidate_caches()
        return site

    yield make
    for module in modules:
        for name in list(sys.modules):
            if name == module or name.startswith(module + "."):
                del sys.modules[name]
    importlib.invalidate_caches()
