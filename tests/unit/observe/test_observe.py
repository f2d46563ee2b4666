"""Metrics files, plots and the MFU estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.observe.metrics import MetricsWriter, read_metrics
from framework.observe.mfu import PEAK_ENV, mfu, peak_tflops
from framework.observe.plots import expert_load_panels, plot_expert_load, plot_loss


def test_metrics_lines_past_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        w.write({"step": step, "loss": 10.0 - step, "bad": float("nan")})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut by a killed run
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["bad"] == "nan"  # strict JSON, no NaN literal
    MetricsWriter(tmp_path, tensorboard=False, resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_plots_are_written(tmp_path: Path) -> None:
    records = [
        {"step": s, "loss": 9 - s * 0.1, **({"val_loss": 9 - s * 0.1} if s % 5 == 0 else {})}
        | {f"moe/layer{layer}/tokens_e{e}": float(10 + e + s) for layer in range(3) for e in range(4)}
        for s in range(1, 21)
    ]
    assert plot_loss(records, tmp_path / "loss.png", baseline=6.3).stat().st_size > 5000
    assert plot_expert_load(records, tmp_path / "expert_load.png").stat().st_size > 5000
    assert plot_expert_load([{"step": 1, "loss": 1.0}], tmp_path / "none.png") is None
    json.dumps(records)


def test_mfu_needs_a_known_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(torch.device("cpu"), "fp32") is None
    assert mfu(1e6, 1e3, None) is None
    monkeypatch.setenv(PEAK_ENV, "2.0")
    peak = peak_tflops(torch.device("cpu"), "fp32")
    assert peak == 2.0
    assert mfu(1e6, 1e3, peak) == pytest.approx(1e9 / 2e12)


def test_expert_load_has_a_panel_per_routing_site(tmp_path: Path) -> None:
    """Any ``<site>/tokens_e<j>`` key is a panel: Chain-of-Experts iterations, a plugin's projections."""
    sites = ["moe/layer10/iter0", "mola/layer0.q_proj", "moe/layer2/iter1", "moe/layer2/iter0"]
    records = [
        {
            "step": s,
            "loss": 1.0,
            **{f"{site}/tokens_e{e}": float(5 + e * s) for site in sites for e in range(3)},
        }
        for s in (1, 2)
    ]
    panels = expert_load_panels(records)
    assert list(panels) == ["moe/layer2/iter0", "moe/layer2/iter1", "moe/layer10/iter0", "mola/layer0.q_proj"]
    assert panels["moe/layer2/iter1"][2] == [(1, 7.0), (2, 9.0)]
    assert plot_expert_load(records, tmp_path / "expert_load.png").stat().st_size > 5000
