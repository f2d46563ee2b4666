"""Deterministic, resumable micro-batches for data-parallel ranks.

The stream is a fixed sequence of sample positions ``p = 0, 1, 2, ...`` mapped to dataset indices (epoch ``e`` covers
positions ``e*N .. (e+1)*N - 1`` of a dataset of length ``N``; with ``seed`` set, each epoch uses its own
permutation, seeded by ``(seed, e)``, otherwise the dataset's own order, which megatron already shuffles by seed;
``shuffle_first_epoch=False`` keeps the dataset's order for epoch 0 and permutes the later ones). Nothing in the
mapping depends on how many positions a run will read, so a longer run starts with the same samples.

Contract (what makes a run equivalent across world sizes). With global batch ``G``, micro-batch ``m``, ``D``
data-parallel ranks and accumulation ``A = G / (D * m)`` micro-batches per rank per optimizer step, global batch
``g`` holds positions ``start + g*G .. start + (g+1)*G - 1`` and rank ``r``'s micro-batch ``j`` (0 <= j < A) of it
holds positions ``start + g*G + (r*A + j)*m .. + m - 1``: exactly the samples a 1-rank run with accumulation ``D*A``
sees in its micro-batch ``r*A + j``. So the union over ranks and micro-batches of one optimizer step is the same
samples, in the same order, for every ``D``; only who computes them differs.

Items: a dataset item is a token tensor of ``seq_len + 1`` ids, stacked to ``[m, seq_len + 1]`` (or split into
``(input_ids, labels)`` with ``as_pairs``); a dataset whose items are something else (SFT's
``(input_ids, labels, position_ids)`` triples) passes ``collate``, which receives the micro-batch's items in stream
order and returns the micro-batch (e.g. :func:`framework.data.sft.collate_sft`).

Resume: :meth:`MicroBatchStream.state` returns ``{"samples_consumed": start + G * (global batches completed)}``; a
new stream with ``start_sample`` set to it continues exactly where the old one stopped (also with a different ``D``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


class MicroBatchStream:
    """Yield this rank's micro-batches (``LongTensor [m, seq_len+1]``, ``(input_ids, labels)``, or what ``collate``
    makes of the items) forever."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        start_sample: int = 0,
        *,
        seed: int | None = None,
        as_pairs: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
        shuffle_first_epoch: bool = True,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size); got dp_rank={dp_rank}, dp_size={dp_size}")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1; got global={global_batch_size}, micro={micro_batch_size}"
            )
        if global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not a multiple of data-parallel ranks ({dp_size}) "
                f"x train.micro_batch_size ({micro_batch_size})"
            )
        if as_pairs and collate is not None:
            raise ValueError("MicroBatchStream: pass as_pairs or collate, not both")
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples < 1:
            raise ValueError("MicroBatchStream: the dataset is empty")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.start_sample = start_sample
        self.seed = seed
        self.shuffle_first_epoch = shuffle_first_epoch
        self.as_pairs = as_pairs
        self.collate = collate
        self.accumulation_steps = global_batch_size // (dp_size * micro_batch_size)
        self._batches_done = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    # ----- positions -----
    def dataset_index(self, position: int) -> int:
        """The dataset index at stream position ``position`` (deterministic, epoch-wrapping)."""
        epoch, offset = divmod(position, self.num_samples)
        if self.seed is None or (epoch == 0 and not self.shuffle_first_epoch):
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return int(self._perm[offset])

    def micro_batch_positions(self, global_batch: int, micro: int) -> range:
        """Stream positions of this rank's micro-batch ``micro`` of global batch ``global_batch``."""
        first = (
            self.start_sample
            + global_batch * self.global_batch_size
            + (self.dp_rank * self.accumulation_steps + micro) * self.micro_batch_size
        )
        return range(first, first + self.micro_batch_size)

    # ----- iteration -----
    def _micro_batch(self, global_batch: int, micro: int) -> Any:
        samples = [
            self.dataset[self.dataset_index(p)] for p in self.micro_batch_positions(global_batch, micro)
        ]
        if self.collate is not None:
            return self.collate(samples)
        batch = torch.stack([torch.as_tensor(s, dtype=torch.long) for s in samples])
        return (batch[:, :-1], batch[:, 1:]) if self.as_pairs else batch

    def next_step(self) -> list[Any]:
        """This rank's ``accumulation_steps`` micro-batches of the next optimizer step; advances :meth:`state`."""
        g = self._batches_done
        batches = [self._micro_batch(g, j) for j in range(self.accumulation_steps)]
        self._batches_done += 1
        return batches

    def __iter__(self) -> Iterator[Any]:
        """Micro-batches one at a time; the state advances when a global batch's last micro-batch is yielded."""
        while True:
            g = self._batches_done
            for j in range(self.accumulation_steps):
                if j == self.accumulation_steps - 1:
                    self._batches_done = g + 1
                yield self._micro_batch(g, j)

    def state(self) -> dict[str, int]:
        """``{"samples_consumed": ...}``: global samples of completed optimizer steps, counted from position 0."""
        return {"samples_consumed": self.start_sample + self._batches_done * self.global_batch_size}
