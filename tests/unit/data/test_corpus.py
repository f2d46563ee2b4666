from __future__ import annotations

from pathlib import Path

from framework.data.corpus import EmbeddedCorpus, scan_corpus, stdlib_root


def _tree(root: Path) -> None:
    files = {
        "zeta.py": "z = 1\n",
        "alpha.py": "a = 'é'\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "def f():\n    return 1\n",
        "site-packages/third.py": "x = 1\n",
        "lib/dist-packages/deb.py": "x = 2\n",
        "pkg/__pycache__/cached.py": "x = 3\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8


def test_selection_sorted_excludes_third_party_and_counts_undecodable(tmp_path: Path) -> None:
    _tree(tmp_path)
    corpus = scan_corpus(tmp_path)
    assert [f.relpath for f in corpus.files] == [
        "alpha.py",
        "latin1.py",
        "pkg/__init__.py",
        "pkg/mod.py",
        "zeta.py",
    ]
    docs = corpus.read()
    assert docs.skipped == ["latin1.py"] and docs.num_skipped == 1
    assert docs.names == ["alpha.py", "pkg/__init__.py", "pkg/mod.py", "zeta.py"]
    assert docs.texts[0] == "a = 'é'\n" and docs.texts[2].startswith("def f()")


def test_fingerprint_tracks_files_sizes_and_python_version(tmp_path: Path) -> None:
    _tree(tmp_path)
    first = scan_corpus(tmp_path)
    assert scan_corpus(tmp_path).fingerprint() == first.fingerprint()
    (tmp_path / "zeta.py").write_text("z = 12345\n", encoding="utf-8")
    assert scan_corpus(tmp_path).fingerprint() != first.fingerprint()
    other_python = EmbeddedCorpus(first.root, first.files, "2.7.18")
    assert other_python.fingerprint() != first.fingerprint()


def test_real_stdlib_listing() -> None:
    corpus = scan_corpus()
    assert corpus.root == stdlib_root()
    names = [f.relpath for f in corpus.files]
    assert len(names) > 500 and names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert not any("site-packages" in n.split("/") or "dist-packages" in n.split("/") for n in names)
