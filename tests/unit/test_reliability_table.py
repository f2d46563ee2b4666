"""docs/reliability.md names the test behind every row: each named test file and test function must exist, so a row
cannot outlive (or be written before) the test that checks it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
DOC = REPO / "docs" / "reliability.md"


def _defined_tests() -> dict[str, set[str]]:
    """``{path relative to tests/: names of the test functions it defines}``."""
    return {
        p.relative_to(TESTS).as_posix(): set(
            re.findall(r"^def (test_\w+)", p.read_text(encoding="utf-8"), re.M)
        )
        for p in TESTS.rglob("test_*.py")
    }


def _references(text: str) -> tuple[set[str], set[tuple[str, str]], set[str]]:
    """(files, (file, test) pairs, bare test names) named in backticks; ``::name`` right after ``file::name`` or
    ``file`` in the same line belongs to that file."""
    files: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    bare: set[str] = set()
    for line in text.splitlines():
        current = None
        for token in re.findall(r"`([^`]+)`", line):
            token = re.sub(r"\[.*\]$", "", token)
            file, _, name = token.partition("::")
            if file.endswith(".py"):
                current = file
                files.add(file)
                if name:
                    pairs.add((file, name))
            elif not file and name and current:
                pairs.add((current, name))
            elif re.fullmatch(r"test_\w+(_…)?", file):  # a test, or a family of tests by prefix
                bare.add(file)
    return files, pairs, bare


def test_every_test_the_reliability_table_names_exists() -> None:
    defined = _defined_tests()
    files, pairs, bare = _references(DOC.read_text(encoding="utf-8"))
    assert len(pairs) >= 20, "the table should name its tests"
    missing_files = sorted(f for f in files if f not in defined and not (TESTS / f).is_dir())
    assert not missing_files, f"docs/reliability.md names test files that do not exist: {missing_files}"
    missing = sorted(f"{f}::{n}" for f, n in pairs if n not in defined.get(f, set()))
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
    every_name = set().union(*defined.values())
    for name in bare:
        if name.endswith("_…"):
            assert any(n.startswith(name[:-1]) for n in every_name), name
        else:
            assert name in every_name, f"docs/reliability.md names {name}, which no test defines"
