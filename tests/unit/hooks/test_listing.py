"""``describe_plugins``: the table ``expertrain plugins [--config F]`` prints."""

from __future__ import annotations

from framework.hooks import describe_plugins

ROUTER = """
from dataclasses import dataclass

from framework.config import option
from framework.hooks import hookimpl

@dataclass
class HashConfig:
    buckets: int = option(8, doc="Hash buckets.", min=1)

@hookimpl
def expertrain_config_sections():
    return {"hashrouter": HashConfig}

@hookimpl
def expertrain_register_components(registry):
    registry.register("router", "hash", object)

@hookimpl
def expertrain_metrics(step):
    return None
"""


def _row(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" ") or not line.strip():
            break
        block.append(line)
    return block


def test_table_lists_every_installed_plugin_with_sections_hooks_and_components(make_dist):
    make_dist("pkg-hash", {"hashrouter": "listing_hash"}, {"listing_hash": ROUTER})
    text = describe_plugins(["hashrouter"])
    header = next(line for line in text.splitlines() if line.startswith("plugin "))
    assert header.split() == ["plugin", "enabled", "package", "sections", "hooks"]
    row = " ".join(_row(text, "hashrouter"))
    assert row.split()[:5] == ["hashrouter", "yes", "pkg-hash", "0.1.0", "hashrouter"]
    assert "config_sections, register_components, metrics" in row
    assert "components: router:hash" in row
    assert "gradnoise" in text  # every installed plugin is listed, enabled or not
    assert _row(text, "gradnoise")[0].split()[1] == "no"


def test_a_plugin_that_cannot_load_is_shown_with_the_reason(make_dist):
    make_dist(
        "pkg-typo", {"typo": "listing_typo"}, {"listing_typo": "def expertrain_step_begn(step):\n    pass\n"}
    )
    row = " ".join(_row(describe_plugins([]), "typo"))
    assert "cannot load:" in row and "expertrain_step_begn" in row


def test_enabled_but_not_installed_is_reported():
    text = describe_plugins(["gradnoise", "not_there"])
    assert "Enabled in the config but NOT installed: not_there" in text
    assert "NOT installed" not in describe_plugins(["gradnoise"])
