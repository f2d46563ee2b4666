"""Where FSDP2 cuts an expert tensor (``expert_shard_placement``): dim 0 when the local experts divide evenly over
the FSDP ranks, else the largest other dimension the ranks divide evenly, never one that cannot be cut evenly."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Shard

from framework.parallel.data_parallel import expert_shard_placement


def test_experts_that_divide_evenly_keep_fsdps_dim_0_cut() -> None:
    assert expert_shard_placement(torch.empty(4, 2, 24, 32, device="meta"), 4) is None
    assert expert_shard_placement(torch.empty(8, 32, 24, device="meta"), 2) is None


def test_fewer_experts_than_ranks_cut_the_largest_dimension_the_ranks_divide() -> None:
    # gate_up [E, 2, I, H] and down [E, H, I] with one local expert over 2 and over 4 ranks
    assert expert_shard_placement(torch.empty(1, 2, 24, 32, device="meta"), 2) == Shard(3)
    assert expert_shard_placement(torch.empty(1, 32, 24, device="meta"), 2) == Shard(1)
    # 6 local experts over 16 ranks: uneven on dim 0; 24 is not a multiple of 16, 32 is
    assert expert_shard_placement(torch.empty(6, 32, 24, device="meta"), 16) == Shard(1)
    # equal sizes: the first of them
    assert expert_shard_placement(torch.empty(1, 8, 8, device="meta"), 2) == Shard(1)


def test_no_evenly_divisible_dimension_falls_back_to_dim_0() -> None:
    # FSDP2 refuses uneven cuts on any dimension but 0: then dim 0 (padded) it is
    assert expert_shard_placement(torch.empty(1, 3, 5, device="meta"), 2) is None
    assert expert_shard_placement(torch.empty(3, device="meta"), 2) is None  # 1-D: nothing else to cut
