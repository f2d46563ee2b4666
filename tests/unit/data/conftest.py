"""Small, fast fixtures for the data tests: generated documents and a tokenizer with a 512-id vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_testutils import SMALL_SETTINGS, make_documents, write_prefix

from framework.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    return train_tokenizer(make_documents(40, seed=123), SMALL_SETTINGS)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> Path:
    return small_tokenizer.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def small_prefix(tmp_path_factory: pytest.TempPathFactory, small_tokenizer: Tokenizer) -> str:
    """60 documents, ~10k tokens, with its tokenizer in ``small.tokenizer``."""
    return write_prefix(tmp_path_factory.mktemp("data"), "small", make_documents(60), small_tokenizer)
