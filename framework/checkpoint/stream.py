"""Tensors streamed out of a checkpoint into safetensors files, one tensor in memory at a time.

- :class:`CheckpointTensors` reads the model tensors of a checkpoint a few at a time: a DCP load of a partial state
  dict (only the requested items' bytes are read), whatever parallel layout saved them.
- :class:`SafetensorsWriter` writes one safetensors file tensor by tensor: the header is computed up front from the
  tensors' names, dtypes and shapes (the file's layout depends on nothing else), then each tensor's bytes go to its
  offset as soon as it is known. The file is byte-identical to ``safetensors.torch.save_file`` of the same tensors
  (which needs every tensor in memory at once and then a second copy of their bytes).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from framework.checkpoint.safe_reader import CheckpointFormatError, SafeFileSystemReader

MODEL_PREFIX = "model."
"""Where the model's tensors sit in a checkpoint's state (``CheckpointStore`` saves ``{"model": ..., ...}``)."""

# safetensors' dtype names, in the order its writer places data in a file (largest alignment first; ties by name).
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DATA_ORDER = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: its name in the file, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def safetensors_layout(
    entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included) of a safetensors file holding ``entries``, and each tensor's
    ``(start, end)`` in the file. Data are ordered as safetensors orders them (dtype, then name)."""
    for entry in entries:
        if entry.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointFormatError(
                f"tensor '{entry.name}' has dtype {entry.dtype}, which the safetensors writer does not handle; "
                f"convert it to one of {', '.join(str(d).removeprefix('torch.') for d in _SAFETENSORS_DTYPES)}"
            )
    ordered = sorted(entries, key=lambda e: (_DATA_ORDER[e.dtype], e.name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata is not None else {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for entry in ordered:
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        spans[entry.name] = (offset, offset + entry.nbytes)
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header so the data start 8-byte aligned
    start = 8 + len(text)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: (start + a, start + b) for name, (a, b) in spans.items()}


class SafetensorsWriter:
    """One safetensors file written tensor by tensor, in any order (see the module docstring).

    :meth:`close` (or leaving it as a context manager) checks that every planned tensor was written."""

    def __init__(
        self, path: Path, entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self._entries = {entry.name: entry for entry in entries}
        header, self._spans = safetensors_layout(entries, metadata)
        self._pending = set(self._entries)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(header)
        self._file.truncate(max([len(header), *(end for _, end in self._spans.values())]))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (dtype and shape as planned) at its place in the file."""
        entry = self._entries[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(
                f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, planned as {entry.dtype} {entry.shape}"
            )
        self._file.seek(self._spans[name][0])
        self._file.write(_raw_bytes(tensor))
        self._pending.discard(name)

    def close(self) -> None:
        """Close the file; raises when a planned tensor was never written."""
        self._file.close()
        if self._pending:
            raise RuntimeError(f"{self.path.name}: tensors never written: {sorted(self._pending)[:3]}")

    def abandon(self) -> None:
        """Close the file without the completeness check (after an error; the caller removes the folder)."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


@dataclass(frozen=True)
class DeferredTensor:
    """A tensor for :func:`save_safetensors` that is made only when its turn to be written comes (e.g. a permuted
    copy of a tensor held elsewhere), so a file of many holds one such copy at a time."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def save_safetensors(
    tensors: Mapping[str, torch.Tensor | DeferredTensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, the same bytes, without its copies: each tensor's
    data goes to the file in turn (made contiguous on the CPU one at a time; a :class:`DeferredTensor` made then),
    so writing a file costs about one tensor of memory beyond ``tensors`` instead of all of them twice. For
    plugins' export files."""
    entries = [TensorEntry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(Path(path), entries, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor.make() if isinstance(tensor, DeferredTensor) else tensor)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's data as little-endian bytes, without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and tensor.element_size() > 1:
        flat = flat.view(-1, tensor.element_size()).flip(1).reshape(-1)
    return memoryview(flat.numpy())


class CheckpointTensors:
    """The model tensors of a checkpoint folder (DCP), by our parameter names, read one or a few at a time.

    ``shapes`` come from the checkpoint's metadata, in the order DCP saved them (not always the model's ``state_dict``
    order: a tensor-parallel run lists its sharded tensors first). :meth:`load` reads only the requested tensors,
    whole (shards of a parallel layout put together)."""

    def __init__(self, path: Path, prefix: str = MODEL_PREFIX) -> None:
        self.path = Path(path)
        self.prefix = prefix
        self._reader = SafeFileSystemReader(str(self.path))
        saved = self._reader.read_metadata().state_dict_metadata
        self._meta: dict[str, TensorStorageMetadata] = {
            key.removeprefix(prefix): value
            for key, value in saved.items()
            if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)
        }

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Name -> global shape, in the order of the checkpoint's metadata."""
        return {name: meta.size for name, meta in self._meta.items()}

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (in ``dtype`` when given and they are floating point, else as stored)."""
        targets = {}
        for name in names:
            if name not in self._meta:
                raise CheckpointFormatError(f"{self.path} holds no model tensor '{name}'")
            stored = self._meta[name].properties.dtype
            want = dtype if dtype is not None and stored.is_floating_point else stored
            targets[self.prefix + name] = torch.empty(self._meta[name].size, dtype=want)
        if targets:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(targets, storage_reader=self._reader, no_dist=True)
        return {key.removeprefix(self.prefix): value for key, value in targets.items()}
