from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from data_testutils import SMALL_SETTINGS, make_documents

import framework.data.embedded as embedded
import framework.data.pretrain as pretrain
from framework.config.sections import DataConfig
from framework.data.corpus import EmbeddedCorpus, scan_corpus
from framework.data.embedded import default_cache_dir, embedded_manifest, prepare_embedded
from framework.data.indexed import open_indexed, validate_indexed
from framework.data.tokenizer import Tokenizer


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> EmbeddedCorpus:
    root = tmp_path / "lib"
    for i, doc in enumerate(make_documents(30, seed=5)):
        path = root / f"pkg{i % 3}" / f"m{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "ignored.py").write_text("x = 1\n", encoding="utf-8")
    (root / "bad.py").write_bytes(b"\xff\xfe not utf-8")
    return scan_corpus(root)


def _prepare(cache: Path, corpus: EmbeddedCorpus) -> tuple[str, str]:
    return prepare_embedded(cache, corpus=corpus, settings=SMALL_SETTINGS, progress=False)


def test_cold_then_cached(
    tmp_path: Path, fake_stdlib: EmbeddedCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix, tok_dir = _prepare(tmp_path / "cache", fake_stdlib)
    info = validate_indexed(prefix)
    manifest = embedded_manifest(prefix)
    assert info.num_documents == 30 and manifest["documents"] == 30
    assert manifest["skipped_undecodable"] == ["bad.py"] and manifest["files"] == 31
    assert sorted(manifest["document_order"]) == sorted(
        f.relpath for f in fake_stdlib.files if f.relpath != "bad.py"
    )
    assert manifest["document_order"] != sorted(
        manifest["document_order"]
    )  # shuffled: validation is a sample
    tokenizer = Tokenizer.from_dir(tok_dir)
    first_doc = (fake_stdlib.root / str(manifest["document_order"][0])).read_text(encoding="utf-8")
    dataset = open_indexed(prefix)  # keep it alive: megatron closes its mmap when the dataset is deleted
    assert dataset[0].tolist() == tokenizer.encode(first_doc, parse_special=False) + [tokenizer.eod]

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a warm cache must not rebuild")

    monkeypatch.setattr(embedded, "write_indexed", boom)
    monkeypatch.setattr(embedded, "train_tokenizer", boom)
    assert _prepare(tmp_path / "cache", fake_stdlib) == (prefix, tok_dir)


def test_killed_prepare_leaves_no_valid_looking_cache(
    tmp_path: Path, fake_stdlib: EmbeddedCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    real = embedded.write_indexed

    def killed(documents: Any, tokenizer: Any, prefix: Any, **kwargs: Any) -> None:
        Path(str(prefix) + ".bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "write_indexed", killed)
    with pytest.raises(KeyboardInterrupt):
        _prepare(cache, fake_stdlib)
    entries = os.listdir(cache / "embedded")
    assert not any(e.startswith("corpus-") and not e.endswith(".lock") for e in entries), entries
    stale = cache / "embedded" / ".corpus-deadbeef.tmp-x"  # as a SIGKILL would leave it
    stale.mkdir()
    monkeypatch.setattr(embedded, "write_indexed", real)
    prefix, _ = _prepare(cache, fake_stdlib)
    assert validate_indexed(prefix).num_documents == 30


def test_damaged_cache_is_rebuilt(tmp_path: Path, fake_stdlib: EmbeddedCorpus) -> None:
    prefix, _ = _prepare(tmp_path, fake_stdlib)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    again, _ = _prepare(tmp_path, fake_stdlib)
    assert again == prefix and validate_indexed(prefix).num_documents == 30


def test_concurrent_callers_build_once(
    tmp_path: Path, fake_stdlib: EmbeddedCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"train": 0, "write": 0}
    real_train, real_write = embedded.train_tokenizer, embedded.write_indexed

    def train(*args: Any, **kwargs: Any) -> Any:
        calls["train"] += 1
        return real_train(*args, **kwargs)

    def write(*args: Any, **kwargs: Any) -> Any:
        calls["write"] += 1
        return real_write(*args, **kwargs)

    monkeypatch.setattr(embedded, "train_tokenizer", train)
    monkeypatch.setattr(embedded, "write_indexed", write)
    results: list[tuple[str, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(_prepare(tmp_path, fake_stdlib))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert calls == {"train": 1, "write": 1}


def test_empty_paths_train_on_the_embedded_corpus(
    tmp_path: Path, fake_stdlib: EmbeddedCorpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pretrain, "prepare_embedded", lambda cache_dir, progress=None: _prepare(Path(cache_dir), fake_stdlib)
    )
    cfg = DataConfig(cache_dir=str(tmp_path), val_fraction=0.1)
    tokenizer = pretrain.load_tokenizer(cfg)
    train, val = pretrain.build_pretrain_datasets(cfg, 16, 0, 100, 10, tokenizer)
    assert val is not None and train[0].shape == (17,)
    assert int(train[0].max()) < tokenizer.vocab_size


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "expertrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "expertrain"


@pytest.mark.skipif(not os.environ.get("EXPERTRAIN_SLOW_TESTS"), reason="~35 s: set EXPERTRAIN_SLOW_TESTS=1")
def test_real_embedded_corpus(tmp_path: Path) -> None:
    prefix, tok_dir = prepare_embedded(tmp_path, progress=False)
    manifest = embedded_manifest(prefix)
    assert int(manifest["documents"]) > 1000 and Tokenizer.from_dir(tok_dir).vocab_size == 8192
