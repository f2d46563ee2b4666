"""Plots written at the end of a run: ``loss.png`` and ``expert_load.png``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LOAD_KEY = re.compile(r"^(?P<panel>[\w./-]+)/tokens_e(?P<expert>\d+)$")
"""Routing-health metrics: ``<panel>/tokens_e<j>``, e.g. ``moe/layer3/tokens_e0``, ``moe/layer3/iter1/tokens_e0``
(one panel per routing site) or a plugin's ``mola/layer0.q_proj/tokens_e2``."""
MAX_LOAD_PANELS = 32


def plot_loss(records: list[dict[str, Any]], path: Path, baseline: float | None = None) -> Path:
    """Train loss per step and validation loss on evaluation steps (and the unigram baseline, if known)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expert_load_panels(records: list[dict[str, Any]]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """``{site: {expert: [(step, tokens), ...]}}`` from the ``<site>/tokens_e<j>`` metrics, sites in layer order,
    at most :data:`MAX_LOAD_PANELS` of them."""
    panels: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for r in records:
        for k, v in r.items():
            m = _LOAD_KEY.match(k)
            if m:
                panels.setdefault(m["panel"], {}).setdefault(int(m["expert"]), []).append((r["step"], v))
    names = sorted(panels, key=_natural_key)[:MAX_LOAD_PANELS]
    return {name: panels[name] for name in names}


def plot_expert_load(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Share of routed tokens per expert over time, one panel per routing site (an MoE layer, one iteration of a
    Chain-of-Experts layer, one MoLA projection)."""
    layers = expert_load_panels(records)
    if not layers:
        return None
    n = len(layers)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        experts = layers[layer]
        steps = [s for s, _ in experts[min(experts)]]
        totals = [sum(experts[e][i][1] for e in experts) or 1.0 for i in range(len(steps))]
        for e in sorted(experts):
            ax.plot(steps, [v / t for (_, v), t in zip(experts[e], totals)], lw=1, label=f"e{e}")
        ax.axhline(1 / len(experts), ls="--", color="gray", lw=0.8)
        ax.set_title(layer.removeprefix("moe/").replace("/", " "), fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("share of routed tokens")
    fig.suptitle("tokens per expert (dashed: perfect balance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
