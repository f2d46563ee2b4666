"""The streaming pieces of an export: a safetensors file written tensor by tensor is byte-identical to
``safetensors.torch.save_file`` (the library is the reference), and a checkpoint's tensors are read one at a time,
touching only their own bytes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from framework.checkpoint.safe_reader import CheckpointFormatError
from framework.checkpoint.store import CheckpointStore
from framework.checkpoint.stream import (
    CheckpointTensors,
    DeferredTensor,
    SafetensorsWriter,
    TensorEntry,
    save_safetensors,
)


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the writer supports, with names out of order, a scalar, an empty tensor and a strided view."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {
        "z.scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "view.transposed": torch.randn(5, 3, generator=g).t(),
        "b.bool": torch.rand(7, generator=g) > 0.5,
    }
    for i, dtype in enumerate(
        (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
    ):
        out[f"w{9 - i}.{dtype}"] = torch.randn(3, 2, generator=g).to(dtype)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32):
        out[f"i.{dtype}"] = torch.randint(0, 100, (4,), generator=g).to(dtype)
    return out


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_streamed_safetensors_file_is_byte_identical_to_save_file(
    tmp_path: Path, metadata: dict[str, str] | None
) -> None:
    tensors = _mixed_tensors()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata=metadata
    )
    entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "ours.safetensors", entries, metadata) as writer:
        for name in reversed(list(tensors)):  # any order: each tensor goes to its own offset
            writer.write(name, tensors[name])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    save_safetensors(tensors, tmp_path / "whole.safetensors", metadata)  # the plugins' one-call form
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    made: list[str] = []  # a deferred tensor is made when written, not before
    deferred = {
        k: DeferredTensor(v.dtype, tuple(v.shape), lambda k=k, v=v: made.append(k) or v)
        for k, v in tensors.items()
    }
    assert not made
    save_safetensors(deferred, tmp_path / "deferred.safetensors", metadata)
    assert made == list(tensors)
    assert (tmp_path / "deferred.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_refuses_a_tensor_other_than_planned_and_a_missing_one(tmp_path: Path) -> None:
    entries = [TensorEntry("a", torch.float32, (2,)), TensorEntry("b", torch.float32, (3,))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match=r"tensor 'a' is torch.float16 \(2,\), planned as torch.float32"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written: \\['b'\\]"):
        writer.close()
    with pytest.raises(CheckpointFormatError, match="dtype torch.complex64"):
        SafetensorsWriter(tmp_path / "y.safetensors", [TensorEntry("c", torch.complex64, (1,))])


class _CountingStream(io.RawIOBase):
    """A file stream that counts the bytes read through it."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self._inner, self._counter = inner, counter

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._counter[0] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer)
        self._counter[0] += n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def count_reads(tensors: CheckpointTensors) -> list[int]:
    """Wrap the reader's file system so every byte read from a ``.distcp`` file is counted."""
    counter = [0]
    fs = tensors._reader.fs
    original = fs.create_stream

    @contextmanager
    def counting(path: Any, mode: str) -> Iterator[io.IOBase]:
        with original(path, mode) as stream:
            yield _CountingStream(stream, counter) if str(path).endswith(".distcp") else stream

    fs.create_stream = counting
    return counter


def test_checkpoint_tensors_read_only_the_requested_bytes(tmp_path: Path) -> None:
    """A 4 MiB tensor and Adam-sized extras beside a 1 KiB one: loading the small one reads ~its bytes (plus
    torch.save's per-item framing, under 8 KiB: 5 KiB measured), not the whole file."""
    g = torch.Generator().manual_seed(0)
    model = {
        "big.weight": torch.randn(1024, 1024, generator=g),
        "small.weight": torch.randn(256, generator=g),
    }
    optim = {"exp_avg": torch.randn(1024, 1024, generator=g)}
    path = CheckpointStore(tmp_path).save(1, {"model": model, "optim": optim}, {"config": {}}, {})
    tensors = CheckpointTensors(path)
    assert list(tensors.shapes) == ["big.weight", "small.weight"]  # model tensors only
    counter = count_reads(tensors)
    small = tensors.load(["small.weight"])["small.weight"]
    assert torch.equal(small, model["small.weight"])
    assert 1024 <= counter[0] < 1024 + 8192, counter[0]
    counter[0] = 0
    big = tensors.load(["big.weight"], dtype=torch.float64)["big.weight"]
    assert big.dtype == torch.float64 and torch.equal(big, model["big.weight"].double())
    assert 4 * 1024**2 <= counter[0] < 4 * 1024**2 + 8192, counter[0]
    with pytest.raises(CheckpointFormatError, match="holds no model tensor 'exp_avg'"):
        tensors.load(["exp_avg"])
