"""Run by test_pretrain.py in a subprocess: build the datasets on 2 gloo ranks, dump the first samples per rank.

Usage: python data_dist_worker.py PREFIX CACHE_DIR OUT_DIR RANK   (start one process per rank, RANK 0 and 1)
Logging is configured at INFO (as a trainer would) so any megatron chatter would show on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch.distributed as dist


def _rank(rank: int, prefix: str, cache: str, out: str) -> None:
    logging.basicConfig(level=logging.INFO)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    try:
        from framework.config.sections import DataConfig
        from framework.data.pretrain import build_pretrain_datasets
        from framework.data.tokenizer import Tokenizer

        cfg = DataConfig(paths=[prefix], cache_dir=cache, val_fraction=0.1)
        tokenizer = Tokenizer.from_dir(prefix + ".tokenizer")
        train, val = build_pretrain_datasets(cfg, 16, 5, 200, 20, tokenizer)
        assert val is not None
        result = {"train": [train[i].tolist() for i in range(8)], "val": [val[i].tolist() for i in range(4)]}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank(int(sys.argv[4]), *sys.argv[1:4])
