"""What the trainer measures without training: the validation loss, a text sample, SFT exact match."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from framework.checkpoint import CheckpointStore
from framework.comm import collectives as C
from framework.config import JobConfig
from framework.data import MicroBatchStream
from framework.observe import console
from framework.train.datasets import TrainingData
from framework.train.forward import LossForward
from framework.train.loss import count_loss_tokens


class Evaluator:
    """Validation loss and text samples on the training model; both leave no routing state behind."""

    def __init__(
        self,
        forward: LossForward,
        config: JobConfig,
        data: TrainingData,
        dp: tuple[int, int],
        tp: int,
        discard_routing_state: Callable[[], None],
    ) -> None:
        """``forward``: the training forward. ``data``: the validation set (``None``: no validation) and tokenizer.
        ``dp``: this rank's data-parallel rank and size. ``tp``: the tensor-parallel size.
        ``discard_routing_state``: forgets what non-training forwards left."""
        self.forward = forward
        self.config = config
        self.val_ds = data.val_ds
        self.tokenizer = data.tokenizer
        self.batch_format = data.batch_format()
        self.dp_rank, self.dp_size = dp
        self.tp = tp
        self.discard_routing_state = discard_routing_state

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean validation loss per token over the first ``train.eval_batches`` micro-batches of the validation set.

        The micro-batches are the same for every data-parallel size: batch ``k`` goes to rank ``k % dp``. A rank left
        without one in the last round (``eval_batches`` not a multiple of dp) runs batch 0 again and drops the result,
        so every rank makes the same number of forward passes (FSDP, tensor and expert parallelism need that).
        """
        cfg = self.config.train
        if self.val_ds is None:
            return None
        model = self.forward.model
        model.eval()
        stream = MicroBatchStream(
            self.val_ds,
            global_batch_size=cfg.micro_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            **self.batch_format,
        )
        batches = list(zip(range(cfg.eval_batches), stream))
        rounds = -(-len(batches) // self.dp_size)
        total = torch.zeros(2, dtype=torch.float64)
        for index in range(self.dp_rank, rounds * self.dp_size, self.dp_size):
            counted = index < len(batches)
            input_ids, labels, position_ids = self.forward.to_device(batches[index if counted else 0][1])
            with self.forward.autocast():
                _, lm_sum = self.forward(input_ids, labels, position_ids)
            if counted:
                total[0] += float(lm_sum)
                total[1] += count_loss_tokens(labels)
        self.discard_routing_state()
        C.all_reduce_sum(total)
        model.train()
        return float(total[0] / total[1].clamp_min(1))

    @torch.no_grad()
    def sample_text(
        self, prompt: str = "def ", tokens: int = 48, temperature: float = 0.8, top_k: int = 40
    ) -> str:
        """Top-k sampling with a generator seeded by ``train.seed``, so every rank draws the same tokens (FSDP runs
        each forward on all ranks); shown on rank 0."""
        model, device, tokenizer = self.forward.model, self.forward.device, self.tokenizer
        model.eval()
        generator = torch.Generator().manual_seed(self.config.train.seed)
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
        for _ in range(tokens):
            window = ids[:, -self.config.data.seq_len :]
            last = window.shape[1] - 1
            # Tensor parallelism splits the sequence evenly: pad on the right (causal attention leaves the real
            # positions unchanged) to a multiple of tp.
            pad = -window.shape[1] % self.tp
            if pad:
                window = torch.cat([window, window.new_full((1, pad), tokenizer.pad)], dim=1)
            with self.forward.autocast():
                logits = model(window)
            if isinstance(logits, DTensor):  # vocabulary-parallel under tensor parallelism
                logits = logits.full_tensor()
            top = torch.topk(logits[0, last].float().cpu() / temperature, top_k)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            nxt = top.indices[choice].view(1, 1).to(device)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tokenizer.eod:
                break
        self.discard_routing_state()
        model.train()
        return tokenizer.decode(ids[0].tolist())


EXACT_MATCH_BATCH = 64
"""Validation prompts of equal length answered together by :func:`exact_match` (one at a time where the model's
experts drop tokens over capacity)."""


def exact_match(
    config: JobConfig, raw_model: torch.nn.Module, store: CheckpointStore, run_dir: Path, forward: LossForward
) -> float | None:
    """Greedy answers to the first ``sft.eval_exact_match`` rows of ``sft.val_file`` (rank 0, one process;
    :data:`EXACT_MATCH_BATCH` prompts at a time): with the training model when it is whole on this rank, else with
    the final checkpoint rebuilt unsharded."""
    from framework.data.sft import BadRow, ChatTokenizer, read_rows
    from framework.inference.generate import exact_match_accuracy, rows_are_independent

    cfg = config.sft
    rows = [{"messages": item[1]} for item in read_rows(cfg.val_file) if not isinstance(item, BadRow)]
    rows = rows[: cfg.eval_exact_match]
    model: Any = raw_model
    if any(isinstance(p, DTensor) for p in raw_model.parameters()):
        latest = store.latest()
        if latest is None:
            console.warn("exact-match evaluation skipped: the model is sharded and no checkpoint was saved")
            return None
        from framework.checkpoint.export import load_model

        model = load_model(latest)[0]
    chat = ChatTokenizer.from_dir(run_dir / "tokenizer")
    with forward.autocast():
        batch = EXACT_MATCH_BATCH if rows_are_independent(model) else 1
        accuracy, _ = exact_match_accuracy(model, chat, rows, cfg.eval_max_new_tokens, batch_size=batch)
    return accuracy
