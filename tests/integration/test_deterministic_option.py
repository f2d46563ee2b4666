"""``train.deterministic`` through the real launcher on CPU: the job runs with torch's deterministic algorithms on
(read inside the job by a plugin) and trains exactly as the default does — on CPU the default is already
deterministic, and with top-2 routing the fixed-order MoE sums are the same two additions (docs/gpu.md)."""

from __future__ import annotations

from pathlib import Path

from framework.observe.metrics import read_metrics
from tests.integration.launch import run_training
from tests.integration.plugin_site import install_plugin

REPORT_ENV = "EXPERTRAIN_TEST_DETERMINISM_REPORT"
REPORT_PLUGIN = f"""
import os

import torch

from framework.hooks import hookimpl


@hookimpl
def expertrain_step_begin(step):
    if step == 1:
        path = os.environ["{REPORT_ENV}"] + "." + os.environ.get("RANK", "0")
        with open(path, "w") as f:
            f.write(str(torch.are_deterministic_algorithms_enabled()))
"""


def test_deterministic_option_is_on_in_every_rank_and_trains_as_the_default(tmp_path: Path) -> None:
    site = install_plugin(tmp_path / "site", "report_determinism", REPORT_PLUGIN)
    losses = {}
    for option in ("true", "false"):
        report = tmp_path / f"enabled-{option}"
        proc = run_training(
            tmp_path / option,
            [f"train.deterministic={option}", "parallel.data=fsdp", "plugins=[report_determinism]"],
            nproc=2,
            env={REPORT_ENV: str(report)},
            extra_path=[site],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = "True" if option == "true" else "False"
        assert [Path(f"{report}.{rank}").read_text() for rank in (0, 1)] == [expected, expected]
        losses[option] = [r["loss"] for r in read_metrics(tmp_path / option / "metrics.jsonl") if "loss" in r]
    assert len(losses["true"]) == 4
    assert losses["true"] == losses["false"]
