"""examples/configs/sft_task.yaml at tiny shapes in one process: the generated task's JSONL files, a base run loaded
through ``model.init_from``, packed SFT batches with the loss on answers only, and the exact-match evaluation of
held-out rows at the end (greedy, KV cache) reported in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.data.sft_tasks import main as make_task
from tests.integration.launch import QUICKSTART, REPO, TINY

SFT_TASK = REPO / "examples" / "configs" / "sft_task.yaml"
QUIET = ("logging.plots=false", "logging.progress=false", "train.sample_tokens=0")


def _train(config: Path, overrides: list[str]) -> dict:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    job, pm = load_job(str(config), [*TINY, *QUIET, *overrides])
    trainer = Trainer(job, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    return trainer.run()


def test_sft_task_example_trains_on_answers_and_reports_exact_match(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "task"
    assert make_task(["--output", str(data), "--train", "200", "--val", "20", "--seed", "1"]) == 0
    base = tmp_path / "base"
    _train(QUICKSTART, [f"run.dir={base}", "train.steps=1", "data.val_fraction=0"])
    run = tmp_path / "sft"
    summary = _train(
        SFT_TASK,
        [
            f"run.dir={run}",
            f"model.init_from={base}",
            f"sft.train_files=[{data / 'train.jsonl'}]",
            f"sft.val_file={data / 'val.jsonl'}",
            "sft.eval_exact_match=6",
            "sft.eval_max_new_tokens=8",
            "train.steps=2",
            "train.eval_batches=2",
        ],
    )
    out = capsys.readouterr().out
    assert "sft train: 200 rows (0 bad) -> 200 samples" in out
    assert "model weights from" in out
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    # 6 rows answered: the accuracy is a multiple of 1/6 (an untrained model scores 0; the value is still computed).
    assert summary["exact_match"] is not None and round(summary["exact_match"] * 6, 6) % 1 == 0
    assert "exact match" in out
    saved = json.loads((run / "summary.json").read_text())
    assert saved["exact_match"] == summary["exact_match"]
