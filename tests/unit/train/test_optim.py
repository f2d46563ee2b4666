"""AdamW groups: a group mixing DTensors and plain tensors is split, so the fused kernel can step it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from framework.config import OptimConfig
from framework.train.optim import build_optimizer, split_mixed_groups


@pytest.fixture
def one_rank_mesh(tmp_path) -> Iterator[object]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_mixed_group_is_split_and_steps(one_rank_mesh: object) -> None:
    model = nn.Module()
    model.plain = nn.Parameter(torch.ones(3, 4))
    model.sharded = nn.Parameter(distribute_tensor(torch.ones(4, 4), one_rank_mesh, [Replicate()]))
    groups = split_mixed_groups([{"params": [model.sharded, model.plain], "weight_decay": 0.1}])
    assert [[type(p) is DTensor for p in g["params"]] for g in groups] == [[False], [True]]
    assert all(g["weight_decay"] == 0.1 for g in groups)
    uniform = [{"params": [model.plain]}]
    assert split_mixed_groups(uniform) == uniform

    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.0), [], torch.device("cpu"))
    (model.plain.sum() + model.sharded.to_local().sum()).backward()
    optimizer.step()  # one fused group with both kinds raises here
    assert torch.all(model.plain < 1) and torch.all(model.sharded.to_local() < 1)
