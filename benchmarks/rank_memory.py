"""One training job under torchrun (or as one process) that reports every rank's peak memory: the entry point the
memory benchmark launches (``benchmarks/memory.py``).

    torchrun --nproc_per_node 4 benchmarks/rank_memory.py --out DIR --config F --set key=value ...

Each rank runs the job in-process the way ``framework.train`` does and writes ``DIR/rank<r>.json``: its peak resident
set (``VmHWM``) and the bytes of tensor data it read from a Hugging Face ``model.init_from`` folder.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    import torch

    from framework.parallel.setup import init_distributed, shutdown
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    config, pm = load_job(args.config, args.overrides)
    info = init_distributed(config.train.device, config.parallel.timeout_s)
    try:
        torch.manual_seed(config.train.seed + info.rank)
        trainer = Trainer(config, pm, info)
        trainer.build()
        summary = trainer.run()
        report = {
            "rank": info.rank,
            "world": info.world_size,
            "peak_rss_mib": proc_status_mib("VmHWM"),
            "hf_bytes_read": trainer.init_bytes_read,
            "steps": summary.get("steps"),
        }
    finally:
        shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{info.rank}.json").write_text(json.dumps(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
