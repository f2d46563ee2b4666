"""Resumable sharded checkpoints (torch DCP, read without unpickling, verified on resume) and exports."""

from framework.checkpoint.lock import RunDirLocked, RunLock, acquire_run_lock
from framework.checkpoint.safe_reader import CheckpointFormatError, SafeFileSystemReader
from framework.checkpoint.store import CheckpointSaveError, CheckpointStore

__all__ = [
    "CheckpointFormatError",
    "CheckpointSaveError",
    "CheckpointStore",
    "RunDirLocked",
    "RunLock",
    "SafeFileSystemReader",
    "acquire_run_lock",
]
