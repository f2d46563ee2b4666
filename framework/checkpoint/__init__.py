"""Resumable sharded checkpoints (torch DCP, read without unpickling) and exports."""

from framework.checkpoint.safe_reader import CheckpointFormatError, SafeFileSystemReader
from framework.checkpoint.store import CheckpointStore

__all__ = ["CheckpointFormatError", "CheckpointStore", "SafeFileSystemReader"]
