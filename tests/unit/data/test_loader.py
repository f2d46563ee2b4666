from __future__ import annotations

import pytest
import torch

from framework.data.loader import MicroBatchStream

SEQ = 3


class IndexDataset(torch.utils.data.Dataset):
    """Sample ``i`` is ``[i, i, ..., i]`` (SEQ + 1 tokens), so a batch shows which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((SEQ + 1,), i, dtype=torch.long)


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def step_micro_batches(stream: MicroBatchStream, steps: int) -> list[list[list[int]]]:
    return [[ids(b) for b in stream.next_step()] for _ in range(steps)]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_union_over_ranks_equals_one_rank_with_accumulation(dp: int, micro: int) -> None:
    data, global_batch, steps = IndexDataset(50), 16, 4  # 4 steps of 16 wrap the 50 samples
    reference = MicroBatchStream(data, global_batch, micro, 0, 1, seed=3)
    ref_steps = step_micro_batches(reference, steps)
    per_rank = [
        step_micro_batches(MicroBatchStream(data, global_batch, micro, r, dp, seed=3), steps)
        for r in range(dp)
    ]
    accumulation = global_batch // (dp * micro)
    for g in range(steps):
        for r in range(dp):
            assert len(per_rank[r][g]) == accumulation
            for j in range(accumulation):
                assert per_rank[r][g][j] == ref_steps[g][r * accumulation + j]
        union = [s for r in range(dp) for mb in per_rank[r][g] for s in mb]
        assert union == [s for mb in ref_steps[g] for s in mb]
        assert len(set(union)) == global_batch  # 16 distinct samples of a 50-sample epoch, within one epoch


def test_epochs_wrap_deterministically() -> None:
    data = IndexDataset(10)
    plain = MicroBatchStream(data, 4, 4, 0, 1)
    assert [ids(plain.next_step()[0]) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    seeded = MicroBatchStream(data, 5, 5, 0, 1, seed=7)
    epochs = [sum((ids(seeded.next_step()[0]) for _ in range(2)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))  # each epoch is a permutation
    assert epochs[0] != epochs[1] and epochs[0] != list(range(10))
    again = MicroBatchStream(data, 5, 5, 0, 1, seed=7)
    assert sum((ids(again.next_step()[0]) for _ in range(2)), []) == epochs[0]


@pytest.mark.parametrize("resume_dp", [1, 2])
def test_resume_from_samples_consumed_equals_uninterrupted(resume_dp: int) -> None:
    data = IndexDataset(23)
    full = MicroBatchStream(data, 8, 2, 0, 1, seed=1)
    uninterrupted = step_micro_batches(full, 7)
    first = MicroBatchStream(data, 8, 2, 0, 1, seed=1)
    step_micro_batches(first, 3)
    state = first.state()
    assert state == {"samples_consumed": 24}
    resumed = [
        MicroBatchStream(data, 8, 2, r, resume_dp, start_sample=state["samples_consumed"], seed=1)
        for r in range(resume_dp)
    ]
    for g in range(4):
        union = [ids(mb) for stream in resumed for mb in stream.next_step()]
        assert union == uninterrupted[3 + g]
    assert resumed[0].state() == {"samples_consumed": 24 + 4 * 8}


def test_iterator_state_and_pairs() -> None:
    stream = MicroBatchStream(IndexDataset(20), 4, 2, 0, 1, as_pairs=True)
    it = iter(stream)
    inputs, labels = next(it)
    assert inputs.shape == labels.shape == (2, SEQ) and inputs.dtype == torch.long
    assert stream.state() == {"samples_consumed": 0}  # half of the global batch
    next(it)
    assert stream.state() == {"samples_consumed": 4}


def test_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple"):
        MicroBatchStream(IndexDataset(5), 10, 4, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchStream(IndexDataset(5), 8, 2, 2, 2)
