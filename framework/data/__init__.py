"""Training data: the embedded corpus, the tokenizer, indexed pretraining datasets and the micro-batch stream.

Importing this package is cheap: megatron-core's dataset modules (~1 s; its whole package ~4 s, see
``_megatron.py``) are loaded only when indexed data is written or datasets are built.
"""

from framework.data.corpus import CorpusDocuments, CorpusFile, EmbeddedCorpus, scan_corpus, stdlib_root
from framework.data.embedded import default_cache_dir, embedded_tokenizer_dir, prepare_embedded
from framework.data.errors import DataError
from framework.data.indexed import IndexInfo, open_indexed, validate_indexed, write_indexed
from framework.data.labels import IGNORE_INDEX
from framework.data.loader import MicroBatchStream
from framework.data.prepare import PrepareResult, add_prepare_arguments, prepare, run_prepare
from framework.data.pretrain import (
    DataSources,
    TokenSequenceDataset,
    build_pretrain_datasets,
    load_tokenizer,
    resolve_data_sources,
    split_inputs_labels,
    unigram_entropy,
)
from framework.data.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerSettings,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "CorpusDocuments",
    "CorpusFile",
    "DataError",
    "DataSources",
    "EmbeddedCorpus",
    "IndexInfo",
    "MicroBatchStream",
    "PrepareResult",
    "TokenSequenceDataset",
    "Tokenizer",
    "TokenizerSettings",
    "add_prepare_arguments",
    "build_pretrain_datasets",
    "default_cache_dir",
    "embedded_tokenizer_dir",
    "load_tokenizer",
    "open_indexed",
    "prepare",
    "prepare_embedded",
    "resolve_data_sources",
    "run_prepare",
    "scan_corpus",
    "split_inputs_labels",
    "stdlib_root",
    "train_tokenizer",
    "unigram_entropy",
    "validate_indexed",
    "write_indexed",
]
