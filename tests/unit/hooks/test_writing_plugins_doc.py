"""docs/writing_plugins.md works as written: its files are extracted, "installed" and loaded by entry point.

The page tags each file's code block with ``<!-- file: path -->``. The test writes those files to a temporary
folder, builds the ``*.dist-info`` that ``pip install -e`` would (from the page's pyproject.toml, without pip), loads
the plugin by name through the entry-point group, types the page's job file, calls the hooks, and runs the page's
own test module.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from framework.config import ConfigError, load_raw, resolve
from framework.hooks import ENTRY_POINT_GROUP, PluginManager, describe_plugins, installed_plugins

tomllib = pytest.importorskip("tomllib")

DOC = Path(__file__).resolve().parents[3] / "docs" / "writing_plugins.md"
BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\s*\n```[\w-]*\n(?P<body>.*?)\n```", re.S)


def doc_files() -> dict[str, str]:
    return {m["path"]: m["body"] + "\n" for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def test_the_page_tags_the_files_of_a_complete_plugin():
    assert set(doc_files()) == {
        "expertrain-myplugin/pyproject.toml",
        "expertrain-myplugin/expertrain_myplugin/plugin.py",
        "expertrain-myplugin/tests/test_myplugin.py",
        "job.yaml",
    }


def install_doc_plugin(root: Path) -> tuple[Path, dict[str, str]]:
    """Write the page's files under ``root`` and the ``*.dist-info`` an editable install would create.

    Returns the project folder (put it on ``sys.path`` / ``PYTHONPATH``) and the page's entry points.
    """
    for rel, body in doc_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    project = root / "expertrain-myplugin"
    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    (package,) = meta["tool"]["setuptools"]["packages"]
    (project / package / "__init__.py").write_text("", encoding="utf-8")  # "empty", says the layout

    name, version = meta["project"]["name"], meta["project"]["version"]
    info = project / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    groups = meta["project"]["entry-points"]
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return project, groups[ENTRY_POINT_GROUP]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The page's package written out and made importable + discoverable like an editable install."""
    project, entry_points = install_doc_plugin(tmp_path)
    package = next(iter(entry_points.values())).split(".")[0]
    monkeypatch.syspath_prepend(str(project))
    importlib.invalidate_caches()
    yield tmp_path, entry_points
    for module in [
        m for m in sys.modules if m == package or m.startswith(package + ".") or m == "test_myplugin"
    ]:
        del sys.modules[module]
    importlib.invalidate_caches()


def test_the_plugin_loads_by_entry_point_and_its_hooks_work(installed):
    tmp_path, entry_points = installed
    assert entry_points == {"myplugin": "expertrain_myplugin.plugin"}
    assert installed_plugins()["myplugin"] == "expertrain_myplugin.plugin"

    pm = PluginManager()
    pm.load(["myplugin"])
    assert pm.hooks_implemented("myplugin") == [
        "expertrain_config_sections",
        "expertrain_validate_config",
        "expertrain_extra_losses",
        "expertrain_metrics",
    ]
    raw = load_raw(tmp_path / "job.yaml")
    config = resolve(raw, pm.config_sections, source="job.yaml")
    assert config.plugins == ["myplugin"] and config.myplugin.coef == 0.0002
    pm.hook.expertrain_validate_config(config=config, world_size=2)

    logits = torch.zeros(2, 3, 8)
    losses = pm.merge_extra_losses(model=None, input_ids=None, logits=logits, config=config)
    assert losses["logit_z"].item() == pytest.approx(0.0002 * math.log(8) ** 2)
    assert pm.merge_metrics(step=1, model=None, config=config) == {"myplugin/coef": 0.0002}


def test_the_pages_job_file_rejects_bad_values(installed):
    tmp_path, _ = installed
    pm = PluginManager()
    pm.load(["myplugin"])
    with pytest.raises(ConfigError, match=r"config key 'myplugin.coef': got -1.0"):
        resolve(load_raw(tmp_path / "job.yaml", ["myplugin.coef=-1"]), pm.config_sections)
    with pytest.raises(ConfigError, match="'myplugin.cof'.*unknown key"):
        resolve(load_raw(tmp_path / "job.yaml", ["myplugin.cof=1"]), pm.config_sections)


def test_the_plugin_is_listed(installed):
    row = next(line for line in describe_plugins(["myplugin"]).splitlines() if line.startswith("myplugin "))
    assert row.split()[:4] == ["myplugin", "yes", "expertrain-myplugin", "0.1.0"]
    assert "extra_losses" in row


def test_the_pages_own_tests_pass(installed):
    tmp_path, _ = installed
    path = tmp_path / "expertrain-myplugin" / "tests" / "test_myplugin.py"
    spec = importlib.util.spec_from_file_location("test_myplugin", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_myplugin"] = module
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()
