"""The job's tokenizer and its training and validation sets: pretraining sequences, or SFT chat samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from framework.comm import collectives as C
from framework.config import ConfigError, JobConfig
from framework.data import MicroBatchStream, build_pretrain_datasets, load_tokenizer
from framework.observe import console


@dataclass
class TrainingData:
    """What the trainer draws micro-batches from."""

    tokenizer: Any
    train_ds: Any
    val_ds: Any
    """``None`` without a validation set."""
    collate: Callable[[list[Any]], Any] | None = None
    """The SFT collate (triples with position ids); ``None`` for pretraining pairs."""

    def batch_format(self) -> dict[str, Any]:
        """How a micro-batch stream groups samples: pretraining pairs, or the SFT collate (with position ids)."""
        return {"collate": self.collate} if self.collate is not None else {"as_pairs": True}

    def train_stream(
        self, config: JobConfig, dp_rank: int, dp_size: int, start_sample: int
    ) -> MicroBatchStream:
        """This data-parallel rank's micro-batches of each step, from sample ``start_sample`` of the run on."""
        return MicroBatchStream(
            self.train_ds,
            global_batch_size=config.train.global_batch_size,
            micro_batch_size=config.train.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            start_sample=start_sample,
            # Pretraining epochs after the first: a permutation of their own (the dataset is one pass, whatever
            # train.steps is). SFT sets keep repeating their order, as before.
            seed=config.train.seed if self.collate is None else None,
            shuffle_first_epoch=False,
            **self.batch_format(),
        )


def build_training_data(config: JobConfig) -> TrainingData:
    """Load the tokenizer (saved into the run folder) and open the datasets; collective: every rank calls it, and a
    failure on one rank fails every rank."""
    cfg = config
    if cfg.sft.train_files and cfg.data.tokenizer:
        # SFT with a tokenizer folder (ours, or a Hugging Face model's): no pretraining corpus is involved.
        from framework.interop.hf.tokenizer import load_hf_tokenizer

        tokenizer = C.run_agreed("loading the tokenizer", lambda: load_hf_tokenizer(cfg.data.tokenizer))
    else:
        # Rank 0 prepares (and caches) the embedded corpus and tokenizer; the others then read the cache.
        C.run_on_rank0("preparing the data", lambda: load_tokenizer(cfg.data) and None)
        tokenizer = C.run_agreed("loading the tokenizer", lambda: load_tokenizer(cfg.data, progress=False))
    C.run_on_rank0("saving the tokenizer", lambda: tokenizer.save(cfg.run_dir / "tokenizer") and None)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"expected at least the tokenizer's vocabulary size {tokenizer.vocab_size}",
        )
    if cfg.sft.train_files:
        from framework.data.sft import build_sft_datasets, collate_sft

        train_ds, val_ds = C.run_agreed(
            "building the SFT datasets", lambda: build_sft_datasets(cfg.sft, tokenizer, cfg.data.seq_len)
        )
        if C.rank() == 0:
            for ds in (train_ds, val_ds):
                if ds is not None:
                    console.info(ds.stats.summary())
        return TrainingData(tokenizer, train_ds, val_ds, collate_sft)
    # The validation text depends on neither train.seed nor the data-parallel size (see evaluation.py).
    val_samples = cfg.train.eval_batches * cfg.train.micro_batch_size
    train_ds, val_ds = C.run_agreed(
        "building the datasets",
        lambda: build_pretrain_datasets(
            cfg.data,
            cfg.data.seq_len,
            cfg.train.seed,
            None,  # one pass over the data, not train.steps' worth: a longer run keeps the sample order
            val_samples,
            tokenizer,
            val_seed=cfg.data.val_seed,
            vocab_size=cfg.model.vocab_size,
        ),
    )
    return TrainingData(tokenizer, train_ds, val_ds)
