"""An MoE variant from outside ``plugins/`` (``outside_moe_variant.py``, written from docs/moe.md alone), installed
under an ``expertrain.plugins`` entry point in a temporary site folder, trains under expert parallelism exactly as
without it: the real trainer on 2 gloo ranks, FSDP2 over both ranks with ``parallel.ep=1`` against ``parallel.ep=2``
(experts split over the ranks, tokens exchanged by all-to-all), the same data on each rank.

Tolerances (those of ``layouts.assert_matches_one_rank``, fp32): losses of the 3 steps within 1e-3 relative (sums
over ranks reorder floating-point additions and Adam amplifies the round-off), step-1 gradients within 1e-5 relative.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from framework.observe.metrics import read_metrics
from tests.distributed.layouts import STEPS, assert_matches_one_rank, train_layouts
from tests.distributed.spawn import run_ranks

PLUGIN = Path(__file__).with_name("outside_moe_variant.py")
MODULE = "expertrain_toy_moe"
JOB = (
    "plugins=[toy_moe]",
    "moe.block=toy_moe",
    "moe.shared_experts=1",
    "toy_moe.prob_variance_coef=0.5",
    "parallel.data=fsdp",
)
LAYOUTS = {"toy-ep1": JOB, "toy-ep2": (*JOB, "parallel.ep=2")}


def _install(site: Path) -> None:
    """The plugin as a third party ships it: its module and a dist-info with the entry point, in ``site``."""
    site.mkdir(parents=True)
    shutil.copy(PLUGIN, site / f"{MODULE}.py")
    info = site / f"{MODULE}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: expertrain-toy-moe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[expertrain.plugins]\ntoy_moe = {MODULE}:ToyMoEPlugin\n")


def _train_with_site(
    rank: int, world: int, site: str, root: str, layouts: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    sys.path.insert(0, site)  # as if pip-installed: found through its entry point only
    importlib.invalidate_caches()
    return train_layouts(rank, world, root, layouts)


def _logged(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.timeout(600)
def test_outside_variant_under_ep2_matches_ep1(tmp_path: Path) -> None:
    site, root = tmp_path / "site", tmp_path / "runs"
    _install(site)
    results = run_ranks(_train_with_site, 2, str(site), str(root), LAYOUTS, timeout=600)[0]
    ref = results["toy-ep1"]
    assert isinstance(ref, dict), f"ep=1 failed:\n{ref}"
    assert_matches_one_rank("toy-ep2", results["toy-ep2"], ref)
    # The variant's own parts are trained and its loss term is part of the objective, on both layouts.
    scale = [g for name, g in ref["grads"].items() if name.endswith("ffn.log_scale")]
    assert scale and all(float(g.abs().sum()) > 0 for g in scale)
    assert any(".shared_experts." in name for name in ref["grads"])
    ep1, ep2 = (_logged(root / name, "loss/toy_prob_variance") for name in LAYOUTS)
    assert len(ep1) == STEPS and all(v > 0 for v in ep1)
    assert ep2 == pytest.approx(ep1, rel=1e-3)
