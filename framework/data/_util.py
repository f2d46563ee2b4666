"""Small helpers shared by the data modules: rank-0 detection, progress switches, atomic cached folders."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def dist_rank() -> int:
    """Global rank: torch.distributed's when initialised, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress_enabled(progress: bool | None) -> bool:
    """Whether to show a progress bar: never off rank 0; ``None`` means "when stderr is a terminal"."""
    if dist_rank() != 0:
        return False
    if progress is None:
        return sys.stderr.isatty()
    return progress


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (a ``.lock`` file beside the guarded entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def cached_folder(final: Path, build: Callable[[Path], None], is_valid: Callable[[Path], bool]) -> Path:
    """Return ``final``, building it first if it is missing or invalid.

    ``build(tmp)`` fills a fresh temporary folder next to ``final``; the folder is renamed into place only when
    ``build`` returns, so a killed build never leaves a ``final`` that looks complete. A file lock makes concurrent
    callers (two ranks, two jobs) build once: the others wait, then find the finished folder.
    """
    if is_valid(final):
        return final
    with file_lock(final.with_name(final.name + ".lock")):
        if is_valid(final):
            return final
        # We hold the lock: any temporary folder of this entry is left over from a killed build.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
