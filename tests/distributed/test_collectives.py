"""The collectives wrapper on real gloo ranks: sums, and failures shared so no rank is left waiting."""

from __future__ import annotations

import torch

from framework.comm import collectives as C
from tests.distributed.spawn import run_ranks


def _sum_and_agree(rank: int, world: int) -> dict:
    total = C.all_reduce_sum(torch.tensor([rank + 1], dtype=torch.int64))
    out: dict = {"sum": int(total), "world": C.world_size(), "rank": C.rank()}

    def fails_on_rank_1() -> int:
        if rank == 1:
            raise ValueError("disk full on rank 1")
        return rank

    try:
        C.run_agreed("writing shards", fails_on_rank_1)
    except Exception as exc:  # noqa: BLE001 - the test inspects what each rank saw
        out["agreed_error"] = f"{type(exc).__name__}: {exc}"

    def rank0_work() -> str:
        raise FileNotFoundError("corpus missing")

    try:
        C.run_on_rank0("preparing data", rank0_work)
    except Exception as exc:  # noqa: BLE001
        out["rank0_error"] = f"{type(exc).__name__}: {exc}"
    out["shared"] = C.run_on_rank0("sharing a value", lambda: {"vocab": 8192})
    return out


def test_failures_reach_every_rank() -> None:
    results = run_ranks(_sum_and_agree, 3)
    assert [r["sum"] for r in results] == [6, 6, 6]
    assert [r["rank"] for r in results] == [0, 1, 2] and all(r["world"] == 3 for r in results)
    assert results[1]["agreed_error"] == "ValueError: disk full on rank 1"
    for r in (0, 2):
        assert results[r]["agreed_error"] == (
            "RankFailure: rank 1 failed during writing shards: ValueError: disk full on rank 1"
        )
    assert results[0]["rank0_error"] == "FileNotFoundError: corpus missing"
    assert results[1]["rank0_error"].startswith(
        "RankFailure: rank 0 failed during preparing data: FileNotFoundError"
    )
    assert all(r["shared"] == {"vocab": 8192} for r in results)


def test_without_a_process_group_everything_is_local() -> None:
    assert C.world_size() == 1 and C.rank() == 0
    t = torch.tensor([3.0])
    assert C.all_reduce_sum(t) is t and float(t) == 3.0
    assert C.run_on_rank0("x", lambda: 5) == 5
