"""One training job under torchrun (or as one process) that reports every rank's peak memory: the entry point the
memory benchmark launches (``benchmarks/memory.py``).

    torchrun --nproc_per_node 4 benchmarks/rank_memory.py --out DIR --config F --set key=value ...

Each rank trains the job in-process (``framework.train.launch.train``) and writes ``DIR/rank<r>.json`` with its peak
resident set (``VmHWM``) and what the phases before the first step held (``VmRSS`` after the model is assembled is
not separable without hooks into the trainer, so only the peak is reported), plus the bytes it read from files
(``/proc/self/io`` ``rchar``), which shows whether a rank read the whole checkpoint or its share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def proc_io_bytes(field: str = "rchar") -> int:
    """Bytes this process read (``rchar``: every read, page cache included) per ``/proc/self/io``."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from framework.parallel.setup import shutdown
    from framework.train.launch import train

    rank = int(os.environ.get("RANK", "0"))
    read_before = proc_io_bytes()
    try:
        summary = train(args.config, args.overrides)
        report = {
            "rank": rank,
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            "peak_rss_mib": proc_status_mib("VmHWM"),
            "read_bytes": proc_io_bytes() - read_before,
            "steps": summary.get("steps"),
        }
    finally:
        shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
