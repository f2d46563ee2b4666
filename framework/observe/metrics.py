"""Metrics on rank 0: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from framework.comm import collectives as C


class MetricsWriter:
    """Appends metrics lines; on resume, lines past the resumed step are dropped so the file stays one history."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = C.rank() == 0
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self._read_lines() if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(x) + "\n" for x in kept), encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None
            )

    def _read_lines(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every well-formed line of a metrics file (a line cut by a killed run is skipped)."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
