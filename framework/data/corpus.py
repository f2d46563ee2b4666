"""The embedded default corpus: the running interpreter's standard-library ``*.py`` files.

Every machine that runs Python has this text, so the quickstart trains on real data with no download. The corpus is
the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, excluding anything below a ``site-packages`` or
``dist-packages`` folder, in sorted order of their POSIX relative paths, one document per file. Files that are not
valid UTF-8 (CPython ships a few on purpose, as test data) are skipped and counted.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_DIRS: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Folder names never descended into: third-party packages and bytecode caches."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    """``major.minor.micro`` of the running interpreter (part of the corpus fingerprint)."""
    return ".".join(str(part) for part in sys.version_info[:3])


@dataclass(frozen=True)
class CorpusFile:
    """One ``*.py`` file of the corpus: its POSIX path relative to the root and its size in bytes."""

    relpath: str
    size: int


@dataclass(frozen=True)
class CorpusDocuments:
    """The decoded text of a corpus: one document per readable file, plus the files that were skipped."""

    texts: list[str]
    names: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """How many files were not valid UTF-8 (or unreadable) and left out."""
        return len(self.skipped)


@dataclass(frozen=True)
class EmbeddedCorpus:
    """The listing of the embedded corpus: which files, in which order, and a fingerprint of that choice."""

    root: Path
    files: tuple[CorpusFile, ...]
    python_version: str

    @property
    def total_bytes(self) -> int:
        """Sum of the listed files' sizes."""
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """Hex SHA-256 of (Python version, sorted relative paths and sizes): changes when the corpus would change."""
        digest = hashlib.sha256()
        digest.update(f"python={self.python_version}\n".encode())
        for f in self.files:
            digest.update(f"{f.relpath}\t{f.size}\n".encode())
        return digest.hexdigest()

    def iter_texts(self, skipped: list[str] | None = None) -> Iterator[tuple[str, str]]:
        """Yield ``(relpath, text)`` per decodable file, in corpus order; undecodable ones go to ``skipped``."""
        for f in self.files:
            try:
                text = (self.root / f.relpath).read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                if skipped is not None:
                    skipped.append(f.relpath)
                continue
            yield f.relpath, text

    def read(self) -> CorpusDocuments:
        """Read every file as UTF-8: one document per file; files that do not decode are skipped and counted."""
        skipped: list[str] = []
        names: list[str] = []
        texts: list[str] = []
        for name, text in self.iter_texts(skipped):
            names.append(name)
            texts.append(text)
        return CorpusDocuments(texts=texts, names=names, skipped=skipped)


def scan_corpus(root: str | os.PathLike[str] | None = None) -> EmbeddedCorpus:
    """List the ``*.py`` files below ``root`` (default: the standard library), sorted, third-party folders excluded.

    Symbolic links to folders are not followed, so a virtual environment linked inside the tree is not picked up.
    The standard library's listing is made once per process (a job resolves its data sources several times).
    """
    if root is None:
        return _scan_stdlib()
    return _scan(Path(root))


@functools.lru_cache(maxsize=1)
def _scan_stdlib() -> EmbeddedCorpus:
    return _scan(stdlib_root())


def _scan(base: Path) -> EmbeddedCorpus:
    if not base.is_dir():
        raise FileNotFoundError(f"corpus root '{base}' is not a folder")
    files: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            files.append(CorpusFile(relpath=path.relative_to(base).as_posix(), size=path.stat().st_size))
    files.sort(key=lambda f: f.relpath)
    return EmbeddedCorpus(root=base, files=tuple(files), python_version=python_version())
