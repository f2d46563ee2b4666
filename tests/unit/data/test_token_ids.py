"""Token ids are range-checked when a dataset opens: an id past the vocabulary (or a negative one) in a ``.bin``
is one :class:`DataError` line naming the file, the id and the vocabulary size, before any sample is read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from data_testutils import make_documents, write_prefix

from framework.config.sections import DataConfig
from framework.data._megatron import megatron_datasets
from framework.data.errors import DataError
from framework.data.indexed import check_token_ids, validate_indexed
from framework.data.pretrain import build_pretrain_datasets
from framework.data.tokenizer import Tokenizer


def _set_token(prefix: str, position: int, value: int) -> None:
    """Overwrite one id of ``prefix.bin`` in place (its dtype from the index)."""
    dtype = validate_indexed(prefix).dtype
    ids = np.memmap(prefix + ".bin", dtype=dtype, mode="r+")
    ids[position] = value
    ids.flush()
    del ids


@pytest.fixture
def prefix(tmp_path: Path, small_tokenizer: Tokenizer) -> str:
    return write_prefix(tmp_path, "d", make_documents(20), small_tokenizer)


def test_ids_within_the_vocabulary_pass(prefix: str, small_tokenizer: Tokenizer) -> None:
    info = validate_indexed(prefix)
    largest = int(np.fromfile(prefix + ".bin", dtype=info.dtype).max())  # independent read of the file
    check_token_ids(info, largest + 1)  # the tightest vocabulary that holds every id
    with pytest.raises(DataError, match=f"holds token id {largest}, but the vocabulary has {largest} ids"):
        check_token_ids(info, largest)


def test_an_id_past_the_vocabulary_names_file_id_and_size(prefix: str, small_tokenizer: Tokenizer) -> None:
    vocab = small_tokenizer.vocab_size
    _set_token(prefix, 17, vocab + 88)
    with pytest.raises(DataError) as caught:
        check_token_ids(validate_indexed(prefix), vocab)
    message = str(caught.value)
    assert "\n" not in message
    assert (
        f"'{prefix}.bin'" in message and f"token id {vocab + 88}" in message and f"has {vocab} ids" in message
    )


def test_dataset_build_refuses_ids_past_the_models_vocabulary(
    tmp_path: Path, prefix: str, small_tokenizer: Tokenizer
) -> None:
    data = DataConfig(paths=[prefix], cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    build_pretrain_datasets(data, 16, 0, 50, 5, small_tokenizer, vocab_size=small_tokenizer.vocab_size)
    _set_token(prefix, 3, 1000)  # below uint16's limit, above the 512-id tokenizer
    with pytest.raises(DataError, match="holds token id 1000, but the vocabulary has 600 ids"):
        build_pretrain_datasets(data, 16, 0, 50, 5, small_tokenizer, vocab_size=600)
    with pytest.raises(DataError, match=f"the vocabulary has {small_tokenizer.vocab_size} ids"):
        build_pretrain_datasets(data, 16, 0, 50, 5, small_tokenizer)  # no model size: the tokenizer's


def test_a_negative_id_in_a_signed_file_is_refused(tmp_path: Path) -> None:
    prefix = str(tmp_path / "signed")
    builder = megatron_datasets().IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([5, 6, 7], [8, -3, 9]):
        builder.add_document(np.asarray(doc, dtype=np.int32), [len(doc)])
    builder.finalize(prefix + ".idx")
    assert os.path.getsize(prefix + ".bin") == 6 * 4
    with pytest.raises(DataError, match=r"signed\.bin' holds a negative token id -3"):
        check_token_ids(validate_indexed(prefix), 100_000)
