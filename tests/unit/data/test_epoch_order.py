"""The training sample order does not depend on how long a run is: the training split is one pass over the data
(``train_samples=None``, what the trainer asks for) and further epochs are seeded permutations of it, so a run
extended to more steps draws the samples a longer run from the start would have drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from data_testutils import make_documents, write_prefix

from framework.config.sections import DataConfig
from framework.data import MicroBatchStream
from framework.data.pretrain import build_pretrain_datasets
from framework.data.tokenizer import Tokenizer

SEQ = 16


def _items(ds: torch.utils.data.Dataset, indices: range | list[int]) -> list[list[int]]:
    return [ds[i].tolist() for i in indices]


def test_one_pass_split_is_the_split_a_run_within_one_epoch_builds(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    data = DataConfig(paths=[small_prefix], cache_dir=str(tmp_path), val_fraction=0.1)
    one_pass, _ = build_pretrain_datasets(data, SEQ, 3, None, 4, small_tokenizer)
    sized, _ = build_pretrain_datasets(data, SEQ, 3, 50, 4, small_tokenizer)  # what a 50-sample run built
    # Runs shorter than an epoch keep their exact samples: megatron builds one epoch for both.
    assert len(one_pass) == len(sized) > 50
    assert _items(one_pass, range(len(one_pass))) == _items(sized, range(len(sized)))
    # A size past one epoch made megatron build several epochs, shuffled together: the first samples changed with
    # the size asked for (what made a longer train.steps reorder a run). The one-pass split has no size to change.
    longer, _ = build_pretrain_datasets(data, SEQ, 3, 3 * len(one_pass), 4, small_tokenizer)
    assert _items(longer, range(50)) != _items(one_pass, range(50))


def test_one_pass_blend_holds_one_pass_of_every_prefix_mixed_by_weight(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    docs = {"a": make_documents(40, seed=1), "b": make_documents(40, seed=2)}
    prefixes = [write_prefix(tmp_path, name, texts, small_tokenizer) for name, texts in docs.items()]
    data = DataConfig(paths=prefixes, weights=[1.0, 3.0], cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    train, _ = build_pretrain_datasets(data, SEQ, 0, None, 4, small_tokenizer)
    # Reference: the training documents (the first 36 of 40 of each prefix) tokenised again, each followed by eod;
    # megatron's samples of SEQ + 1 tokens overlap by one, so a pass over T tokens holds (T - 1) // SEQ samples.
    expected = 0
    for texts in docs.values():
        tokens = sum(len(small_tokenizer.encode(t, parse_special=False)) + 1 for t in texts[:36])
        expected += (tokens - 1) // SEQ
    assert len(train) == expected
    share_b = float(np.mean(np.asarray(train.megatron_dataset.dataset_index) == 1))
    assert abs(share_b - 0.75) < 0.02  # megatron's greedy blend: within a few samples of the weights
    again, _ = build_pretrain_datasets(data, SEQ, 0, None, 4, small_tokenizer)
    assert _items(again, range(len(again))) == _items(train, range(len(train)))


def test_later_epochs_are_seeded_permutations_and_the_first_keeps_the_dataset_order(
    tmp_path: Path, small_prefix: str, small_tokenizer: Tokenizer
) -> None:
    data = DataConfig(paths=[small_prefix], cache_dir=str(tmp_path), val_fraction=0.1)
    train, _ = build_pretrain_datasets(data, SEQ, 0, None, 4, small_tokenizer)
    n = len(train)

    def stream(start: int = 0, seed: int = 5) -> MicroBatchStream:
        return MicroBatchStream(train, 4, 2, 0, 1, start, seed=seed, shuffle_first_epoch=False)

    indices = [stream().dataset_index(p) for p in range(3 * n)]
    epochs = [indices[e * n : (e + 1) * n] for e in range(3)]
    # Epoch 0 is the dataset's own (megatron-shuffled) order: runs within one epoch keep their samples.
    assert epochs[0] == list(range(n))
    for later in epochs[1:]:
        assert sorted(later) == list(range(n)) and later != epochs[0]  # every sample once, in a new order
    assert epochs[1] != epochs[2]
    assert [stream(seed=6).dataset_index(p) for p in range(n, 2 * n)] != epochs[1]  # the seed decides it

    # A stream resumed in the third epoch (another process: no cached permutation) continues the same sequence.
    start = 2 * n + 4
    resumed = stream(start)
    uninterrupted = stream()
    for _ in range(start // 4):
        uninterrupted.next_step()
    for _ in range(3):
        assert [b.tolist() for b in resumed.next_step()] == [b.tolist() for b in uninterrupted.next_step()]


def test_a_split_shorter_than_one_sample_repeats_its_documents(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    docs = ["doc0 def x", "doc1 return y", "doc2 class z"]
    prefix = write_prefix(tmp_path, "short", docs, small_tokenizer)
    data = DataConfig(paths=[prefix], cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    train, _ = build_pretrain_datasets(data, 64, 0, None, 1, small_tokenizer)
    # Reference: the three documents, each followed by eod, are fewer than 65 tokens; a sample wraps around them.
    ids = [small_tokenizer.encode(t, parse_special=False) + [0] for t in docs]
    assert sum(map(len, ids)) < 65 and len(train) >= 1
    sample = train[0].tolist()
    assert len(sample) == 65 and set(sample) <= {i for doc in ids for i in doc}
