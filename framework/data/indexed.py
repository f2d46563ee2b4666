"""Tokenised documents in megatron-core's indexed format (``PREFIX.bin`` + ``PREFIX.idx``), written and checked.

Each document is encoded and followed by the tokenizer's ``eod`` id; one document is one megatron "sequence".
Files are written under temporary names and renamed into place, so a killed run never leaves a pair that looks
complete. :func:`validate_indexed` checks a pair against its own header in O(1) reads, so a truncated or corrupt file
stops with one line naming it instead of a numpy traceback deep inside a data loader.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framework.data._megatron import megatron_datasets
from framework.data._util import progress_enabled
from framework.data.errors import DataError
from framework.data.tokenizer import Tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_DTYPES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
PREPARE_HINT = "re-run `expertrain data prepare --input FILES --output {prefix}` to rebuild it"


@dataclass(frozen=True)
class IndexInfo:
    """What a valid ``.bin``/``.idx`` pair holds."""

    prefix: str
    dtype: type[np.number]
    num_documents: int
    num_sequences: int
    num_tokens: int


def token_dtype(vocab_size: int) -> type[np.number]:
    """Smallest dtype megatron-core uses for ``vocab_size`` ids (uint16 below 65500, else int32)."""
    return megatron_datasets().DType.optimal_dtype(vocab_size)


def _fail(path: str, problem: str, prefix: str, hint: str | None) -> DataError:
    return DataError(f"data file '{path}' {problem}; {(hint or PREPARE_HINT).format(prefix=prefix)}")


def validate_indexed(prefix: str | os.PathLike[str], hint: str | None = None) -> IndexInfo:
    """Check that ``prefix.bin`` and ``prefix.idx`` exist and agree with the index header; return their summary.

    Raises :class:`DataError` (one line naming the file and the fix) when a file is missing, truncated or corrupt.
    ``hint`` replaces the default fix ("re-run `expertrain data prepare` ..."); ``{prefix}`` in it is filled in.
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            extra = ""
            if prefix.endswith((".bin", ".idx")):
                extra = f" (a prefix has no extension: did you mean '{prefix[:-4]}'?)"
            raise DataError(
                f"data prefix '{prefix}': '{path}' not found{extra}; prepare it with "
                f"`expertrain data prepare --input FILES --output {prefix}` or fix data.paths"
            )
    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER_BYTES:
        raise _fail(
            idx_path,
            f"is truncated ({idx_size} bytes, shorter than the {_HEADER_BYTES}-byte header)",
            prefix,
            hint,
        )
    with open(idx_path, "rb") as stream:
        header = stream.read(_HEADER_BYTES)
    if header[:9] != INDEX_MAGIC:
        raise _fail(idx_path, "is not a megatron index (bad magic bytes)", prefix, hint)
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in _DTYPES:
        raise _fail(idx_path, f"has an unknown version {version} or dtype code {code}", prefix, hint)
    expected_idx = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_size < expected_idx:
        raise _fail(
            idx_path, f"is truncated ({idx_size} bytes, its header promises {expected_idx})", prefix, hint
        )
    if idx_size not in (expected_idx, expected_idx + n_seq):  # + n_seq: multimodal mode bytes
        raise _fail(
            idx_path, f"is corrupt ({idx_size} bytes, its header promises {expected_idx})", prefix, hint
        )
    if n_doc < 1:
        raise _fail(idx_path, "is corrupt (no document boundary table)", prefix, hint)
    lengths = np.fromfile(idx_path, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    doc_bounds = np.fromfile(idx_path, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    if doc_bounds[0] != 0 or doc_bounds[-1] != n_seq or (n_seq and lengths.min() < 0):
        raise _fail(idx_path, "is corrupt (inconsistent sequence and document tables)", prefix, hint)
    dtype = _DTYPES[code]
    num_tokens = int(lengths.sum(dtype=np.int64))
    expected_bin = num_tokens * np.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < expected_bin:
        raise _fail(
            bin_path, f"is truncated ({bin_size} bytes, its index expects {expected_bin})", prefix, hint
        )
    if bin_size > expected_bin:
        raise _fail(
            bin_path, f"does not match its index ({bin_size} bytes, expected {expected_bin})", prefix, hint
        )
    return IndexInfo(prefix, dtype, n_doc - 1, n_seq, num_tokens)


@functools.lru_cache(maxsize=256)
def sequence_lengths(info: IndexInfo, count: int | None = None) -> np.ndarray:
    """The token counts of the first ``count`` sequences (all when ``None``) of a prefix :func:`validate_indexed`
    accepted, read from its ``.idx``."""
    n = info.num_sequences if count is None else min(count, info.num_sequences)
    return np.fromfile(info.prefix + ".idx", dtype=np.int32, count=n, offset=_HEADER_BYTES)


def _token_id_range(bin_path: str, version: tuple[int, int, int], dtype_name: str) -> tuple[int, int]:
    """The smallest and largest id in ``bin_path`` (one sequential pass over its memory map; cached per file
    ``version``, its inode, size and mtime, so every dataset build of a process reads a file once and a rewritten
    or re-prepared file is read again). ``(0, 0)`` for an empty file."""
    del version  # part of the cache key only
    if os.path.getsize(bin_path) == 0:
        return 0, 0
    ids = np.memmap(bin_path, dtype=np.dtype(dtype_name), mode="r")
    try:
        low = int(ids.min()) if np.issubdtype(ids.dtype, np.signedinteger) else 0
        return low, int(ids.max())
    finally:
        del ids


def check_token_ids(info: IndexInfo, vocab_size: int) -> None:
    """Every token id of ``info``'s ``.bin`` is in ``0 .. vocab_size - 1``, or one :class:`DataError` line naming
    the file, the offending id and the vocabulary size (before training, where an id past the embedding table
    would be an index error on CPU and a device-side assert on GPU). Costs one read of the file per process."""
    bin_path = info.prefix + ".bin"
    stat = os.stat(bin_path)
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    low, high = _token_id_range(bin_path, version, np.dtype(info.dtype).name)
    if low < 0:
        raise DataError(
            f"data file '{bin_path}' holds a negative token id {low}; it is corrupt or not token ids: "
            + PREPARE_HINT.format(prefix=info.prefix)
        )
    if high >= vocab_size:
        raise DataError(
            f"data file '{bin_path}' holds token id {high}, but the vocabulary has {vocab_size} ids "
            f"(0..{vocab_size - 1}); it was tokenised with a larger tokenizer: prepare it with the job's tokenizer, "
            "or set model.vocab_size (and data.tokenizer) to the ones it was made with"
        )


def open_indexed(prefix: str | os.PathLike[str], hint: str | None = None) -> Any:
    """Validate then open ``prefix`` as a megatron-core ``IndexedDataset`` (memory-mapped).

    Keep the returned object alive while using arrays it returned: they are views of its memory map, which megatron
    closes when the dataset is deleted (``open_indexed(p)[0].tolist()`` can crash the interpreter; copy instead).
    """
    validate_indexed(prefix, hint)
    return megatron_datasets().IndexedDataset(os.fspath(prefix), multimodal=False, mmap=True)


def write_indexed(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    prefix: str | os.PathLike[str],
    *,
    total: int | None = None,
    progress: bool | None = None,
    desc: str = "tokenising",
    batch_size: int = 128,
) -> IndexInfo:
    """Encode ``documents`` (each followed by ``eod``) into ``prefix.bin``/``prefix.idx``; return their summary.

    Special-token text inside documents is encoded as plain text, so a document cannot forge an ``eod``.
    ``total`` (documents, when known) sizes the progress bar, shown on rank 0 only (``None``: when stderr is a tty).
    The pair appears atomically: both files are written under temporary names and renamed when complete.
    """
    from tqdm import tqdm

    prefix = os.fspath(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = prefix + ".bin" + suffix, prefix + ".idx" + suffix
    dtype = token_dtype(tokenizer.vocab_size)
    builder = megatron_datasets().IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    eod = tokenizer.eod
    bar = tqdm(total=total, desc=desc, unit="doc", disable=not progress_enabled(progress), dynamic_ncols=True)
    try:
        batch: list[str] = []

        def flush() -> None:
            for ids in tokenizer.encode_batch(batch):
                ids.append(eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            bar.update(len(batch))
            batch.clear()

        for text in documents:
            batch.append(text)
            if len(batch) >= batch_size:
                flush()
        flush()
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, prefix + ".bin")
        os.replace(tmp_idx, prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        bar.close()
    return validate_indexed(prefix)
