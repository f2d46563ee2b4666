"""The trainer runs the LM head only at labelled positions (SFT) unless a plugin's extra loss asks for the logits;
both paths train identically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from framework.data.sft_tasks import write_task
from framework.hooks import hookimpl
from framework.parallel.setup import DistInfo
from framework.train.launch import load_job
from framework.train.trainer import Trainer


class _FullLogitsProbe:
    """An extra loss that declares ``logits`` (so the head must run everywhere) and records their shape."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    @hookimpl
    def expertrain_extra_losses(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(logits.shape))
        return {"probe": 0.0 * logits.sum()}


def _trainer(tmp_path: Path, name: str, probe: _FullLogitsProbe | None) -> Trainer:
    data = tmp_path / "data"
    if not data.exists():
        write_task(data, train=96, val=8, seed=0)
    job: dict[str, Any] = {
        "plugins": [],
        "model": {"vocab_size": 8192, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 64, "max_seq_len": 64},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32},
        "data": {"seq_len": 64},
        "sft": {"train_files": [str(data / "train.jsonl")], "val_file": str(data / "val.jsonl"), "packing": True},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "eval_every": 0, "sample_tokens": 0,
                  "eval_batches": 2},
        "checkpoint": {"every": 0, "save_final": False, "resume": False},
        "logging": {"tensorboard": False, "progress": False, "plots": False},
        "run": {"dir": str(tmp_path / name)},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(job), encoding="utf-8")
    config, pm = load_job(str(path), [])
    if probe is not None:
        pm.register_object("probe", probe)
    trainer = Trainer(config, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    return trainer


def test_head_at_labels_trains_like_the_full_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fast = _trainer(tmp_path, "fast", None)
    torch.manual_seed(0)
    probe = _FullLogitsProbe()
    full = _trainer(tmp_path, "full", probe)
    assert fast.forward.head_at_labels and not full.forward.head_at_labels
    for step in (1, 2, 3):
        a, b = fast.train_step(step), full.train_step(step)
        assert a.tokens == b.tokens > 0
        assert abs(a.loss - b.loss) <= 1e-5 * abs(b.loss), (step, a.loss, b.loss)
        assert abs(a.grad_norm - b.grad_norm) <= 1e-4 * b.grad_norm, (step, a.grad_norm, b.grad_norm)
    assert probe.shapes and all(s == (2, 64, 8192) for s in probe.shapes)
    for (name, p), q in zip(fast.raw_model.named_parameters(), full.raw_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    # Validation takes the same path: the same loss either way.
    assert (
        abs(fast.evaluator.validation_loss() - full.evaluator.validation_loss())
        <= 1e-5 * full.evaluator.validation_loss()
    )
