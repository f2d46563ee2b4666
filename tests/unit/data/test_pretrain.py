from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_testutils import SMALL_SETTINGS, make_documents, write_prefix

from framework.config.errors import ConfigError
from framework.config.sections import DataConfig
from framework.data.errors import DataError
from framework.data.pretrain import build_pretrain_datasets, split_inputs_labels, unigram_entropy
from framework.data.tokenizer import Tokenizer, train_tokenizer

SEQ = 16
HERE = Path(__file__).parent


def _build(prefix: str, cache: Path, tokenizer: Tokenizer, seed: int = 0, **cfg: object):
    data = DataConfig(paths=[prefix], cache_dir=str(cache), val_fraction=0.1, **cfg)  # type: ignore[arg-type]
    return build_pretrain_datasets(data, SEQ, seed, 300, 30, tokenizer)


def _first(ds: torch.utils.data.Dataset, n: int = 10) -> list[list[int]]:
    return [ds[i].tolist() for i in range(n)]


def test_samples_shape_and_determinism(tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer) -> None:
    train, val = _build(small_prefix, tmp_path / "a", small_tokenizer, seed=1)
    assert val is not None and len(train) >= 300 and len(val) >= 30
    sample = train[0]
    assert sample.shape == (SEQ + 1,) and sample.dtype == torch.long
    inputs, labels = split_inputs_labels(sample)
    assert torch.equal(inputs[1:], labels[:-1])
    again, _ = _build(
        small_prefix, tmp_path / "b", small_tokenizer, seed=1
    )  # fresh cache: rebuilt from scratch
    assert _first(again) == _first(train)
    cached, _ = _build(small_prefix, tmp_path / "a", small_tokenizer, seed=1)  # warm cache
    assert _first(cached) == _first(train)
    other, _ = _build(small_prefix, tmp_path / "a", small_tokenizer, seed=2)
    assert _first(other) != _first(train)
    assert len(list((tmp_path / "a" / "indices").glob("*/COMPLETE"))) == 2


def test_train_and_validation_documents_are_disjoint(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    train, val = _build(small_prefix, tmp_path, small_tokenizer)
    assert val is not None
    train_docs = set(np.asarray(train.megatron_dataset.document_index).tolist())
    val_docs = set(np.asarray(val.megatron_dataset.document_index).tolist())
    assert train_docs.isdisjoint(val_docs)
    assert train_docs | val_docs == set(range(60)) and len(val_docs) == 6  # 10 % of 60 documents
    # and by content: every validation sample's tokens come from validation documents only
    seen = {
        int(m)
        for i in range(len(val))
        for m in re.findall(r"\bdoc(\d+) ", small_tokenizer.decode(val[i].tolist()))
    }
    assert seen and seen <= val_docs


def test_blend_weights_are_respected(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    a = write_prefix(tmp_path, "a", make_documents(40, seed=1), small_tokenizer)
    b = write_prefix(tmp_path, "b", make_documents(40, seed=2), small_tokenizer)
    cfg = DataConfig(paths=[a, b], weights=[1.0, 3.0], cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    train, val = build_pretrain_datasets(cfg, SEQ, 0, 2000, 100, small_tokenizer)
    assert val is not None
    share_b = float(np.mean(np.asarray(train.megatron_dataset.dataset_index) == 1))
    assert abs(share_b - 0.75) < 0.02
    assert len(train) == 2000 and train[1999].shape == (SEQ + 1,)


def test_bad_inputs_fail_with_one_line(tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match="not found"):
        _build(str(tmp_path / "missing"), tmp_path, small_tokenizer)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        tiny = write_prefix(tmp_path, "tiny", make_documents(3), small_tokenizer)
        _build(tiny, tmp_path, small_tokenizer)
    other = train_tokenizer(make_documents(30, seed=99), SMALL_SETTINGS)
    with pytest.raises(DataError, match="tokenised with the tokenizer in"):
        _build(small_prefix, tmp_path, other)


def test_killed_index_build_is_rebuilt(tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer) -> None:
    train, _ = _build(small_prefix, tmp_path, small_tokenizer)
    (index_dir,) = [p for p in (tmp_path / "indices").iterdir() if p.is_dir()]
    (index_dir / "COMPLETE").unlink()
    for npy in index_dir.glob("*shuffle_index.npy"):
        npy.write_bytes(npy.read_bytes()[:40])  # a half-written file megatron would otherwise trust
    rebuilt, _ = _build(small_prefix, tmp_path, small_tokenizer)
    assert _first(rebuilt) == _first(train) and (index_dir / "COMPLETE").is_file()


def test_unigram_entropy() -> None:
    assert unigram_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
    assert unigram_entropy([np.array([3, 3, 3, 3])]) == pytest.approx(0.0)
    samples = [torch.tensor([9, 0, 1, 2, 3]), torch.tensor([9, 0, 0, 0, 0])]  # first position is not a label

    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> torch.Tensor:
            return samples[i]

    probs = np.array([5, 1, 1, 1]) / 8
    assert unigram_entropy(Samples()) == pytest.approx(float(-(probs * np.log(probs)).sum()))


def test_unigram_entropy_of_a_split_counts_its_documents(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    """A megatron split is counted from its documents: exactly their tokens, and close to the label positions of
    its samples (the same text, cut into samples and repeated over epochs)."""
    _, val = _build(small_prefix, tmp_path, small_tokenizer)
    assert val is not None
    split = val.megatron_dataset
    tokens = np.concatenate([np.asarray(split.dataset[int(i)]) for i in split.indices]).astype(np.int64)
    assert unigram_entropy(val) == pytest.approx(unigram_entropy([tokens]), rel=1e-12)
    by_samples = unigram_entropy(val, max_samples=len(val))  # the sample loop
    assert by_samples == pytest.approx(unigram_entropy(val), abs=0.05)


def test_two_gloo_ranks_build_the_same_datasets_quietly(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    worker = [
        sys.executable,
        str(HERE / "data_dist_worker.py"),
        small_prefix,
        str(tmp_path / "cache"),
        str(out),
    ]
    procs = [
        subprocess.Popen(
            [*worker, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for r in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for proc, (_, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr[-3000:]
        for noise in ("megatron", "Transformer Engine", "Apex", "Warning"):
            assert noise not in stderr, stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    cfg = DataConfig(paths=[small_prefix], cache_dir=str(tmp_path / "local"), val_fraction=0.1)
    train, val = build_pretrain_datasets(cfg, 16, 5, 200, 20, small_tokenizer)
    assert val is not None
    assert ranks[0]["train"] == _first(train, 8) and ranks[0]["val"] == _first(val, 4)
