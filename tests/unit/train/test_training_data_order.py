"""The trainer's training data (``framework/train/datasets.py``): the samples of the first steps are the same
whatever ``train.steps`` is, also when the run reads past the end of its data into further epochs."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from framework.config import resolve
from framework.data.indexed import write_indexed
from framework.data.tokenizer import TokenizerSettings, train_tokenizer
from framework.train.datasets import build_training_data

STEPS_READ = 12  # 48 samples: several epochs of the 10-document training split


def _first_steps(tmp_path: Path, prefix: str, steps: int, seed: int = 0) -> list[torch.Tensor]:
    config = resolve(
        {
            "run": {"dir": str(tmp_path / f"run{steps}_{seed}")},
            "model": {"vocab_size": 512, "max_seq_len": 16},
            "data": {"paths": [prefix], "seq_len": 16, "val_fraction": 0.0, "cache_dir": str(tmp_path / "c")},
            "train": {"steps": steps, "seed": seed, "global_batch_size": 4, "micro_batch_size": 2},
        }
    )
    data = build_training_data(config)
    assert 2 * len(data.train_ds) <= STEPS_READ * 4  # the steps read cross at least two epoch boundaries
    stream = data.train_stream(config, dp_rank=0, dp_size=1, start_sample=0)
    return [torch.cat([torch.cat(pair, dim=1) for pair in stream.next_step()]) for _ in range(STEPS_READ)]


def test_the_first_steps_draw_the_same_samples_whatever_train_steps_is(tmp_path: Path) -> None:
    rng = random.Random(4)
    words = ["def", "return", "class", "x", "y", "=", "+", "(", ")", ":", "\n"]
    docs = [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) for i in range(10)]
    tokenizer = train_tokenizer(docs * 4, TokenizerSettings(vocab_size=512, min_frequency=2))
    prefix = str(tmp_path / "d")
    write_indexed(docs, tokenizer, prefix, progress=False)
    tokenizer.save(prefix + ".tokenizer")
    short, long = _first_steps(tmp_path, prefix, 3), _first_steps(tmp_path, prefix, 300)
    assert all(torch.equal(a, b) for a, b in zip(short, long, strict=True))
    other_seed = _first_steps(tmp_path, prefix, 300, seed=1)
    assert not all(
        torch.equal(a, b) for a, b in zip(long, other_seed, strict=True)
    )  # the comparison can fail
