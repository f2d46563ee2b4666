from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_testutils import make_documents

from framework.data.errors import DataError
from framework.data.indexed import open_indexed, validate_indexed, write_indexed
from framework.data.tokenizer import Tokenizer


def test_megatron_reads_back_identical_tokens(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    docs = [*make_documents(12), "", "text with <|endoftext|> inside"]
    info = write_indexed(docs, small_tokenizer, tmp_path / "d", progress=False, batch_size=5)
    expected = [small_tokenizer.encode(d, parse_special=False) + [small_tokenizer.eod] for d in docs]
    assert (info.num_documents, info.num_sequences) == (len(docs), len(docs))
    assert info.num_tokens == sum(map(len, expected)) and info.dtype == np.uint16
    dataset = open_indexed(tmp_path / "d")
    assert len(dataset) == len(docs)
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids
    # The forged end-of-document in the last text is plain text: only the appended one is eod.
    assert dataset[len(docs) - 1].tolist().count(small_tokenizer.eod) == 1
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


@pytest.fixture
def written(tmp_path: Path, small_tokenizer: Tokenizer) -> str:
    prefix = str(tmp_path / "d")
    write_indexed(make_documents(8), small_tokenizer, prefix, progress=False)
    return prefix


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_bin_is_one_clear_error(written: str) -> None:
    _truncate(written + ".bin", os.path.getsize(written + ".bin") - 10)
    with pytest.raises(DataError) as err:
        open_indexed(written)
    message = str(err.value)
    assert f"'{written}.bin' is truncated" in message and "expertrain data prepare" in message
    assert "\n" not in message


@pytest.mark.parametrize("keep", [20, 60])
def test_truncated_idx_is_one_clear_error(written: str, keep: int) -> None:
    _truncate(written + ".idx", keep)  # inside the header, then inside the tables
    with pytest.raises(DataError, match=rf"'{written}\.idx' is truncated.*expertrain data prepare"):
        validate_indexed(written)


def test_corrupt_idx_magic(written: str) -> None:
    with open(written + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    with pytest.raises(DataError, match="not a megatron index"):
        validate_indexed(written)


def test_missing_prefix_names_the_file(tmp_path: Path, written: str) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match=rf"'{missing}\.idx' not found.*expertrain data prepare"):
        validate_indexed(missing)
    with pytest.raises(DataError, match="did you mean"):
        validate_indexed(written + ".bin")


def test_failed_write_leaves_nothing(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    def docs() -> Iterator[str]:
        yield from make_documents(3)
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError):
        write_indexed(docs(), small_tokenizer, tmp_path / "d", progress=False, batch_size=2)
    assert os.listdir(tmp_path) == []
