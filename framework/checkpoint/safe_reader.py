"""A torch-DCP reader that never unpickles arbitrary objects.

DCP stores its ``.metadata`` file as a pickle. :class:`SafeFileSystemReader` reads it with an unpickler that only
resolves the handful of DCP metadata classes, torch sizes and dtypes, and refuses checkpoints that hold pickled
(non-tensor) values, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from framework.errors import CheckpointFormatError

_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULE_PREFIXES) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module == "enum" or (module == "torch.storage" and name.endswith("Storage")):
            return super().find_class(module, name)
        raise CheckpointFormatError(
            f"checkpoint metadata refers to {module}.{name}, which an expertrain checkpoint never contains; "
            "refusing to load it (it could run code)"
        )


class SafeFileSystemReader(FileSystemReader):
    """:class:`FileSystemReader` with a restricted metadata unpickler and no pickled values."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _RestrictedUnpickler(stream).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
                raise CheckpointFormatError(f"unreadable checkpoint metadata in {self.path}: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointFormatError(f"{self.path} does not hold DCP metadata")
        pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if pickled:
            raise CheckpointFormatError(
                f"{self.path} stores pickled values ({', '.join(pickled[:3])}); refusing to load them"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
