"""Every hook has a section in docs/hooks.md and at least one test (the pattern of datasette's test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from framework.hooks import hook_names

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "hooks.md"
TESTS = ROOT / "tests"
HOOKS = hook_names()


def test_specs_define_hooks():
    assert len(HOOKS) >= 17 and all(h.startswith("expertrain_") for h in HOOKS)


@pytest.fixture(scope="module")
def doc_headings() -> set[str]:
    return set(re.findall(r"^### (expertrain_\w+)\s*$", DOC.read_text(encoding="utf-8"), flags=re.M))


@pytest.fixture(scope="module")
def test_sources() -> str:
    this = Path(__file__).resolve()
    return "\n".join(
        p.read_text(encoding="utf-8") for p in sorted(TESTS.rglob("*.py")) if p.resolve() != this
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook, doc_headings):
    assert hook in doc_headings, f"docs/hooks.md has no '### {hook}' section"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook, test_sources):
    assert re.search(rf"\b{hook}\b", test_sources), f"no test under tests/ mentions {hook}"


def test_docs_do_not_describe_hooks_that_do_not_exist(doc_headings):
    assert doc_headings <= set(HOOKS), (
        f"docs/hooks.md documents unknown hooks: {sorted(doc_headings - set(HOOKS))}"
    )


def test_docs_follow_the_lifecycle_order():
    text = DOC.read_text(encoding="utf-8")
    positions = [text.index(f"### {hook}") for hook in HOOKS]
    assert positions == sorted(positions), "docs/hooks.md lists the hooks out of the order of specs.py"
