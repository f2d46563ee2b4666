"""Pretraining datasets: a seeded blend of indexed prefixes through megatron-core's ``GPTDataset``.

``build_pretrain_datasets`` resolves ``data.paths`` (or the embedded corpus when empty), checks every ``.bin``/``.idx``
pair and its tokenizer, then builds train and validation splits with ``BlendedMegatronDatasetBuilder``:

* split by documents: the first ``1 - data.val_fraction`` of each prefix's documents train, the rest validate
  (megatron's contiguous split; the embedded corpus is written in a shuffled order so its tail is a random sample);
* documents and samples are shuffled by ``seed`` (megatron's ``random_seed``);
* several prefixes are blended with ``data.weights`` (equal when empty).

Each item of the returned datasets is a ``LongTensor`` of ``seq_len + 1`` tokens: ``input_ids = x[:-1]``,
``labels = x[1:]`` (see :func:`split_inputs_labels`).

Index cache: megatron's ``.npy`` indices live in ``<cache_dir>/indices/<key>/`` where ``<key>`` hashes the prefixes
(with their files' size and mtime, so re-prepared data never reuses stale indices), weights, seed, lengths, split and
tokenizer. A ``COMPLETE`` marker is written when a build finishes; a folder without it (a killed build) is rebuilt.
Blend indices (cheap) are computed in memory: megatron-core 0.16's ``BlendedDataset`` calls
``torch.distributed.get_rank()`` unguarded when it caches, which fails without an initialised process group.

Distributed: works without ``torch.distributed`` and with it initialised. When initialised, call it on every rank:
megatron builds on rank 0, barriers, then the other ranks load the cache (which must be on a filesystem all ranks
see, as with megatron). Inputs are validated on every rank before any barrier, so a bad path fails everywhere
instead of hanging. Rank 0 (or a lone process) holds a file lock while building, so concurrent jobs sharing a cache
build once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from framework.config.errors import ConfigError
from framework.config.sections import DataConfig
from framework.data._megatron import megatron_datasets, quiet_megatron_logs
from framework.data._util import file_lock
from framework.data.embedded import prepare_embedded, resolve_cache_dir
from framework.data.errors import DataError
from framework.data.indexed import IndexInfo, check_token_ids, sequence_lengths, validate_indexed
from framework.data.tokenizer import TOKENIZER_FILE, Tokenizer

INDEX_FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"


@dataclass(frozen=True)
class DataSources:
    """What ``data`` resolves to: prefixes, normalised-later weights and the tokenizer folder."""

    prefixes: list[str]
    weights: list[float]
    tokenizer_dir: str
    embedded: bool


def tokenizer_dir_for_prefix(prefix: str) -> Path:
    """Where ``expertrain data prepare`` puts the tokenizer of ``prefix``: the folder ``PREFIX.tokenizer``."""
    return Path(prefix + ".tokenizer")


def resolve_data_sources(data_cfg: DataConfig, *, progress: bool | None = None) -> DataSources:
    """Turn ``data`` into prefixes, weights and a tokenizer folder; prepares the embedded corpus when ``paths`` is empty.

    Every prefix is validated (missing / truncated files raise :class:`DataError`). With ``paths`` set and
    ``data.tokenizer`` empty, the tokenizer is ``PREFIX.tokenizer`` of the first prefix.
    """
    if not data_cfg.paths:
        prefix, tok_dir = prepare_embedded(data_cfg.cache_dir or None, progress=progress)
        return DataSources([prefix], [1.0], data_cfg.tokenizer or tok_dir, embedded=True)
    prefixes = [os.fspath(Path(p).expanduser()) for p in data_cfg.paths]
    for prefix in prefixes:
        validate_indexed(prefix)
    weights = [float(w) for w in data_cfg.weights] if data_cfg.weights else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ConfigError("data.weights", data_cfg.weights, f"expected one weight per path ({len(prefixes)})")
    if any(not w > 0 for w in weights):
        raise ConfigError("data.weights", data_cfg.weights, "expected positive numbers")
    tok_dir = data_cfg.tokenizer
    if not tok_dir:
        candidate = tokenizer_dir_for_prefix(prefixes[0])
        if not (candidate / TOKENIZER_FILE).is_file():
            raise ConfigError(
                "data.tokenizer",
                "",
                f"expected a tokenizer folder: '{candidate}' (written by `expertrain data prepare`) does not exist",
            )
        tok_dir = str(candidate)
    return DataSources(prefixes, weights, tok_dir, embedded=False)


def load_tokenizer(data_cfg: DataConfig, *, progress: bool | None = None) -> Tokenizer:
    """The tokenizer ``data`` trains with (prepares the embedded corpus first when ``data.paths`` is empty)."""
    return Tokenizer.from_dir(resolve_data_sources(data_cfg, progress=progress).tokenizer_dir)


def _check_tokenizer(sources: DataSources, tokenizer: Tokenizer) -> None:
    """Every prefix that carries its own tokenizer must have been tokenised with ``tokenizer``."""
    for prefix in sources.prefixes:
        tok_dir = tokenizer_dir_for_prefix(prefix)
        if (tok_dir / TOKENIZER_FILE).is_file() and Tokenizer.from_dir(
            tok_dir
        ).fingerprint != tokenizer.fingerprint:
            raise DataError(
                f"data prefix '{prefix}' was tokenised with the tokenizer in '{tok_dir}', not the one in use; "
                "re-run `expertrain data prepare --tokenizer DIR` with one tokenizer for every path, "
                "or point data.tokenizer at that folder"
            )


def _split_counts(num_docs: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) document counts exactly as megatron rounds the split matrix."""
    boundary = int(round((1.0 - val_fraction) * float(num_docs)))
    return boundary, num_docs - boundary


def _split_string(val_fraction: float) -> str:
    return f"{1.0 - val_fraction:.10f},{val_fraction:.10f},0"


def _index_cache_dir(
    data_cfg: DataConfig, sources: DataSources, tokenizer: Tokenizer, spec: dict[str, Any]
) -> Path:
    files = []
    for prefix in sources.prefixes:
        for ext in (".bin", ".idx"):
            stat = os.stat(prefix + ext)
            files.append([os.path.abspath(prefix + ext), stat.st_size, stat.st_mtime_ns])
    payload = json.dumps(
        {
            "v": INDEX_FORMAT_VERSION,
            "files": files,
            "weights": sources.weights,
            "tok": tokenizer.fingerprint,
            **spec,
        },
        sort_keys=True,
    ).encode("utf-8")
    key = hashlib.sha256(payload).hexdigest()[:16]
    return resolve_cache_dir(data_cfg.cache_dir or None) / "indices" / key


def _builder_class() -> type:
    """megatron's builder with in-memory blend indices (see the module docstring)."""
    m = megatron_datasets()

    class _InMemoryBlendedDataset(m.BlendedDataset):  # type: ignore[name-defined,misc]
        def _build_indices(self) -> tuple[np.ndarray, np.ndarray]:
            config = self.config
            self.config = copy.copy(config)
            self.config.path_to_cache = None
            try:
                return super()._build_indices()
            finally:
                self.config = config

    class _Builder(m.BlendedMegatronDatasetBuilder):  # type: ignore[name-defined,misc]
        @staticmethod
        def build_generic_dataset(
            cls: Any, is_built_on_rank: Any, synchronize_ranks: bool, *args: Any
        ) -> Any:
            if cls is m.BlendedDataset:
                cls = _InMemoryBlendedDataset
            return m.BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return _Builder


class TokenSequenceDataset(torch.utils.data.Dataset):
    """Samples of ``seq_len + 1`` token ids (``LongTensor``) drawn from a megatron GPT or blended dataset."""

    def __init__(self, megatron_dataset: Any, seq_len: int) -> None:
        self.megatron_dataset = megatron_dataset
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.megatron_dataset[int(index)]
        return torch.cat([item["tokens"], item["labels"][-1:]])


def _split_documents(source: Any) -> Iterable[np.ndarray] | None:
    """The token arrays of every document of a :class:`TokenSequenceDataset`'s megatron split, or ``None`` when
    ``source`` is anything else (a blend, whose weights would also matter, or another dataset)."""
    split = getattr(source, "megatron_dataset", None) if isinstance(source, TokenSequenceDataset) else None
    indexed, indices = getattr(split, "dataset", None), getattr(split, "indices", None)
    if indexed is None or indices is None or not hasattr(indexed, "__getitem__"):
        return None
    return (indexed[int(i)] for i in indices)


def _one_epoch_samples(info: IndexInfo, n_train: int, seq_len: int) -> int:
    """The samples of ``seq_len + 1`` tokens one pass over a prefix's first ``n_train`` sequences gives (megatron's
    count: samples overlap by one token)."""
    tokens = int(sequence_lengths(info, n_train).sum(dtype=np.int64))
    return max(0, (tokens - 1) // seq_len)


def split_inputs_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` = ``(x[..., :-1], x[..., 1:])`` of samples of ``seq_len + 1`` tokens."""
    return tokens[..., :-1], tokens[..., 1:]


def _build_splits(
    data_cfg: DataConfig,
    sources: DataSources,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    train_samples: int | None,
    val_samples: int,
) -> tuple[Any, Any]:
    """megatron's ``(train, validation)`` splits shuffled by ``seed`` (cached; see the module docstring)."""
    val_fraction = float(data_cfg.val_fraction)
    m = megatron_datasets()
    quiet_megatron_logs()
    spec = {
        "seed": seed,
        "seq_len": seq_len,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "val_fraction": val_fraction,
    }
    cache = _index_cache_dir(data_cfg, sources, tokenizer, spec)
    blend = (sources.prefixes, None if len(sources.prefixes) == 1 else sources.weights)
    config = m.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=blend,
        split=_split_string(val_fraction),
        path_to_cache=str(cache),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.05,
        num_dataset_builder_threads=1,
    )
    sizes = [train_samples, val_samples, 0]

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    lock = file_lock(cache.with_name(cache.name + ".lock")) if rank == 0 else contextlib.nullcontext()
    with lock:
        if rank == 0 and cache.exists() and not (cache / COMPLETE_MARKER).is_file():
            shutil.rmtree(cache)  # left by a killed build: megatron would trust half-written .npy files
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train, val, _ = _builder_class()(m.GPTDataset, sizes, lambda: True, config).build()
        if rank == 0:
            cache.mkdir(parents=True, exist_ok=True)
            (cache / COMPLETE_MARKER).touch()
    return train, val


def build_pretrain_datasets(
    data_cfg: DataConfig,
    seq_len: int,
    seed: int,
    train_samples: int | None,
    val_samples: int,
    tokenizer: Tokenizer,
    *,
    val_seed: int | None = None,
    vocab_size: int | None = None,
) -> tuple[TokenSequenceDataset, TokenSequenceDataset | None]:
    """Build ``(train, validation)`` datasets of ``seq_len + 1``-token samples; validation is None if val_fraction is 0.

    ``train_samples`` / ``val_samples`` are the least numbers of samples wanted (megatron builds whole epochs, so the
    datasets may be longer). ``train_samples=None`` (what the trainer passes) builds the training split as one pass
    over its data: its length and order then depend on the data, ``seq_len`` and ``seed`` only, never on how many
    samples a run will draw (:class:`~framework.data.loader.MicroBatchStream` reads on past its end, one seeded
    permutation per further epoch), so a run extended to more steps keeps its samples. For a run shorter than one
    epoch it is the same dataset a ``train_samples`` build gives (megatron builds one epoch either way). A blend
    gets as many samples as one pass over every prefix's training documents holds, mixed by ``data.weights``.
    The training split is shuffled by ``seed``; the validation split by ``val_seed``
    (``None`` = ``seed``), so with a fixed ``val_seed`` every training seed is scored on the same held-out text.
    Deterministic for the seeds. Call on every rank when torch.distributed is initialised. Every token id must be
    below ``vocab_size`` (the model's; ``None``: the tokenizer's, which the trainer keeps <= the model's), else a
    :class:`DataError` names the file (:func:`~framework.data.indexed.check_token_ids`).
    """
    if seq_len < 1:
        raise ConfigError("data.seq_len", seq_len, "expected an integer >= 1")
    if train_samples is not None and train_samples < 1:
        raise ValueError(f"train_samples must be >= 1 or None, got {train_samples}")
    sources = resolve_data_sources(data_cfg)
    _check_tokenizer(sources, tokenizer)
    val_fraction = float(data_cfg.val_fraction)
    one_pass: list[int] = []
    for prefix in sources.prefixes:
        info = validate_indexed(prefix)
        check_token_ids(info, tokenizer.vocab_size if vocab_size is None else vocab_size)
        n_train, n_val = _split_counts(info.num_sequences, val_fraction)
        one_pass.append(_one_epoch_samples(info, n_train, seq_len))
        if n_train < 1 or (val_fraction > 0 and n_val < 1):
            raise ConfigError(
                "data.val_fraction",
                val_fraction,
                f"'{prefix}' has {info.num_sequences} documents, which leaves {n_train} for training and {n_val} "
                "for validation; add documents or change data.val_fraction (0 disables validation)",
            )
    has_val = val_fraction > 0
    if has_val and val_samples < 1:
        raise ValueError(f"val_samples must be >= 1 when data.val_fraction > 0, got {val_samples}")

    if train_samples is None and len(sources.prefixes) > 1:
        train_samples = sum(max(1, n) for n in one_pass)  # megatron needs a size to blend by weights
    elif train_samples is None and one_pass[0] < 1:
        train_samples = 1  # a split shorter than one sample: megatron repeats its documents until one fits
    train, val = _build_splits(
        data_cfg, sources, tokenizer, seq_len, seed, train_samples, val_samples if has_val else 0
    )
    if has_val and val_seed is not None and val_seed != seed:
        # A build of its own: megatron shuffles every split of one build by one seed. Its training split is kept
        # to one sample (cheap); megatron builds each split from its own documents, size and seed only.
        _, val = _build_splits(data_cfg, sources, tokenizer, seq_len, val_seed, 1, val_samples)
    return TokenSequenceDataset(train, seq_len), (TokenSequenceDataset(val, seq_len) if has_val else None)


def unigram_entropy(
    source: torch.utils.data.Dataset | Iterable[Any], *, max_samples: int | None = None
) -> float:
    """Entropy in nats of the token unigram distribution of ``source``.

    ``source`` is either a dataset of ``seq_len + 1`` samples (then the label positions ``x[1:]`` are counted, the
    tokens a language model is scored on) or an iterable of token ids / arrays of ids (all counted). This is the
    loss of the best context-free predictor: a model's validation loss should go below it. A
    :class:`TokenSequenceDataset` over one megatron split (not a blend) is counted from the split's documents
    directly: every sample is cut from them, so the distribution is the same up to the epoch boundary, and reading
    thousands of samples one by one took seconds at the end of every run.
    """
    counts = np.zeros(0, dtype=np.int64)

    def add(ids: np.ndarray) -> None:
        nonlocal counts
        if ids.size == 0:
            return
        binc = np.bincount(ids.reshape(-1), minlength=counts.size)
        if binc.size > counts.size:
            binc[: counts.size] += counts
            counts = binc
        else:
            counts += binc

    documents = _split_documents(source) if max_samples is None else None
    if documents is not None:
        for ids in documents:
            add(np.asarray(ids, dtype=np.int64))
    elif isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        n = len(source) if max_samples is None else min(len(source), max_samples)
        for i in range(n):
            add(np.asarray(source[i])[1:].astype(np.int64))
    else:
        scalars: list[int] = []
        for seen, item in enumerate(source):
            if max_samples is not None and seen >= max_samples:
                break
            if isinstance(item, (int, np.integer)):
                scalars.append(int(item))
            else:
                add(np.asarray(item, dtype=np.int64))
        add(np.asarray(scalars, dtype=np.int64))
    total = counts.sum()
    if total == 0:
        raise ValueError("unigram_entropy: no tokens in the source")
    probs = counts[counts > 0] / total
    return float(-(probs * np.log(probs)).sum())
