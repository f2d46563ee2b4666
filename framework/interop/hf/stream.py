"""Hugging Face safetensors shards written one native tensor at a time.

The plan comes first and needs no data: every rule's HF tensors (names, shapes) from our tensors' shapes (the
conversions run on ``meta`` tensors), grouped into files of at most ``max_shard_bytes`` in rule order, exactly as
the whole-state-dict writer grouped them. Then each of our tensors is loaded (from a live model or a checkpoint),
converted, and its HF tensors are written at their places in their files (:class:`SafetensorsWriter`); a file is
closed as soon as its last tensor is in. Peak memory: about one of our tensors and its converted copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from framework.checkpoint.stream import SafetensorsWriter, TensorEntry
from framework.interop.hf.state_map import Rule, rule_to_hf

SHARD_METADATA = {"format": "pt"}
"""The safetensors metadata transformers writes (and reads to know the tensors are torch's)."""


def plan_hf_tensors(
    rules: Sequence[Rule], shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, torch.dtype]
) -> list[TensorEntry]:
    """The HF tensors the rules write, in writing order, from our tensors' shapes and dtypes."""
    entries = []
    for rule in rules:
        empty = torch.empty(tuple(shapes[rule.native]), dtype=dtypes[rule.native], device="meta")
        entries += [TensorEntry(key, t.dtype, tuple(t.shape)) for key, t in rule_to_hf(rule, empty)]
    return entries


def group_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive tensors into files of at most ``max_shard_bytes`` (a tensor larger than that gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def write_hf_tensors(
    rules: Sequence[Rule],
    shards: Sequence[Sequence[TensorEntry]],
    files: Sequence[Path],
    load: Callable[[str], torch.Tensor],
) -> None:
    """Write ``shards[i]`` to ``files[i]``: ``load(native name)`` gives each of our tensors in turn (dropped once
    its HF tensors are written)."""
    shard_of = {entry.name: i for i, shard in enumerate(shards) for entry in shard}
    left = [len(shard) for shard in shards]
    writers: dict[int, SafetensorsWriter] = {}
    try:
        for rule in rules:
            for key, value in rule_to_hf(rule, load(rule.native)):
                i = shard_of[key]
                if i not in writers:
                    writers[i] = SafetensorsWriter(files[i], shards[i], SHARD_METADATA)
                writers[i].write(key, value)
                left[i] -= 1
                if not left[i]:
                    writers.pop(i).close()
    finally:
        for writer in writers.values():
            writer.abandon()
