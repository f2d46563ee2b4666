"""The launcher types a job's core sections before torch loads: a bad key or value fails at once, on every rank."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.launch import QUICKSTART, REPO

PROBE = """
import sys
from framework.train.launch import main
code = main(["--config", sys.argv[1], *[a for kv in sys.argv[2:] for a in ("--set", kv)]])
print(code, "torch" in sys.modules)
"""


def _launch(*overrides: str, rank: str = "0") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "", "PYTHONPATH": str(REPO), "RANK": rank, "WORLD_SIZE": "2"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(QUICKSTART), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "config key 'train.stepz': got 3; unknown key"),
        ("train.steps=many", "config key 'train.steps'"),
        ("data.paths=[x, y", "lists are written [a, b, c]"),
        ("model.dim=-4", "config key 'model.dim'"),
    ],
)
def test_a_bad_core_value_fails_before_torch_is_imported(override: str, message: str) -> None:
    proc = _launch(override, rank="1")
    assert proc.stdout.split() == ["1", "False"], proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert line.startswith("[rank 1] expertrain: error: ") and message in line, line
    assert "\n" not in line  # one line, no traceback


def test_plugin_sections_are_typed_once_the_plugin_loads() -> None:
    """A plugin's section is not typed early (its class comes with the plugin): its errors come after torch."""
    proc = _launch("plugins=[lora]", "lora.rr=2")
    assert proc.stdout.split() == ["1", "True"], proc.stderr[-2000:]
    assert "config key 'lora.rr': got 2; unknown key" in proc.stderr
