"""The validation set is fixed by ``data.val_seed``: the same token ids for every training seed and sample count."""

from __future__ import annotations

from pathlib import Path

import torch

from framework.config.sections import DataConfig
from framework.data.pretrain import build_pretrain_datasets
from framework.data.tokenizer import Tokenizer

SEQ = 16
VAL_SAMPLES = 24


def _samples(ds: torch.utils.data.Dataset, n: int) -> list[list[int]]:
    return [ds[i].tolist() for i in range(n)]


def _build(
    prefix: str, cache: Path, tokenizer: Tokenizer, seed: int, train_samples: int, val_seed: int | None
):
    data = DataConfig(paths=[prefix], cache_dir=str(cache), val_fraction=0.1)
    return build_pretrain_datasets(data, SEQ, seed, train_samples, VAL_SAMPLES, tokenizer, val_seed=val_seed)


def test_validation_token_ids_are_identical_across_training_seeds_and_sizes(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    train_a, val_a = _build(small_prefix, tmp_path, small_tokenizer, seed=0, train_samples=300, val_seed=7)
    train_b, val_b = _build(small_prefix, tmp_path, small_tokenizer, seed=1, train_samples=520, val_seed=7)
    assert val_a is not None and val_b is not None
    assert _samples(train_a, 20) != _samples(train_b, 20)  # the seeds do change the training order
    assert _samples(val_a, VAL_SAMPLES) == _samples(val_b, VAL_SAMPLES)


def test_validation_seed_equal_to_the_training_seed_keeps_the_single_build(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    """``val_seed == seed`` (the defaults) gives the validation split megatron shuffled with the training split, so
    runs at the default seed keep their earlier validation text."""
    _, joint = _build(small_prefix, tmp_path, small_tokenizer, seed=3, train_samples=300, val_seed=None)
    _, same = _build(small_prefix, tmp_path, small_tokenizer, seed=3, train_samples=300, val_seed=3)
    _, other = _build(small_prefix, tmp_path, small_tokenizer, seed=3, train_samples=300, val_seed=4)
    assert joint is not None and same is not None and other is not None
    assert _samples(joint, VAL_SAMPLES) == _samples(same, VAL_SAMPLES)
    assert _samples(other, VAL_SAMPLES) != _samples(joint, VAL_SAMPLES)


def test_separately_built_validation_split_matches_a_joint_build_with_that_seed(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    """Independent reference: the split built on its own with ``val_seed`` equals the one megatron builds together
    with a training split at that seed."""
    _, separate = _build(small_prefix, tmp_path, small_tokenizer, seed=0, train_samples=300, val_seed=5)
    _, joint = _build(small_prefix, tmp_path, small_tokenizer, seed=5, train_samples=300, val_seed=None)
    assert separate is not None and joint is not None
    assert _samples(separate, VAL_SAMPLES) == _samples(joint, VAL_SAMPLES)
