"""Resumable checkpoints on disk: atomic, pointed to by ``latest``, the last N kept.

Layout under ``run.dir/checkpoints/``::

    step_00000010/          a complete checkpoint
        .metadata, *.distcp torch distributed checkpoint of tensors (model, optimizer, plugin tensors)
        rng_rank{r}.safetensors   per-rank RNG states
        meta.json           written last: step, plain values, config fingerprint; its presence marks completeness
    latest                  the name of the newest complete checkpoint, replaced atomically after it is in place

A save writes into ``step_XXXXXXXX.tmp`` and renames it into place only after every rank has written and
``meta.json`` is flushed, so a killed save never leaves a folder that loads as valid.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from framework.checkpoint.safe_reader import CheckpointFormatError, SafeFileSystemReader
from framework.checkpoint.tree import overlay_plain, split_tensors
from framework.parallel import collectives as C

META = "meta.json"
LATEST = "latest"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    """Checkpoints of one run folder."""

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    # --- discovery ------------------------------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name
        ]
        return sorted((p for p in found if (p / META).is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the ``latest`` pointer if valid, else the newest complete folder."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text(encoding="utf-8").strip()
            if (candidate / META).is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        try:
            meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(
                f"{path} is not a complete expertrain checkpoint ({META} unreadable: {exc}); "
                "point --checkpoint at a step_XXXXXXXX folder or a run folder"
            ) from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{path} has checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        return meta

    # --- save -----------------------------------------------------------------------------------------------------

    def save(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], rng: dict[str, torch.Tensor]
    ) -> Path:
        """Collective: every rank calls it with its shard of ``state`` (nested tensors and plain values)."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if C.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        C.barrier()
        tensors, plain = split_tensors(state)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors or {}, checkpoint_id=tmp, no_dist=not C.is_distributed())
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng_rank{C.rank()}.safetensors"))
        C.barrier()
        if C.rank() == 0:
            full_meta = {"format_version": FORMAT_VERSION, "step": step, "plain": plain, **meta}
            with open(tmp / META, "w", encoding="utf-8") as f:
                json.dump(full_meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / (LATEST + ".tmp")
            pointer_tmp.write_text(final.name, encoding="utf-8")
            os.replace(pointer_tmp, self.root / LATEST)
            self._prune()
        C.barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # --- load -----------------------------------------------------------------------------------------------------

    @staticmethod
    def load(
        path: Path, target: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """Load into ``target`` (same nesting as saved; tensors filled in place). Returns (state, meta, rng of this rank)."""
        path = Path(path)
        meta = CheckpointStore.read_meta(path)
        tensors, _ = split_tensors(target)
        reader = SafeFileSystemReader(str(path))
        reader.read_metadata()  # a clean error for a corrupt or unsafe checkpoint, before DCP wraps it
        if tensors:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(tensors, storage_reader=reader, no_dist=not C.is_distributed())
        state = _fill(target, tensors)
        # Only the parts the caller asked for (an export loads the model without the optimizer).
        plain = {k: v for k, v in (meta.get("plain") or {}).items() if k in target}
        state = overlay_plain(state, plain)
        rng_file = path / f"rng_rank{C.rank()}.safetensors"
        rng = load_file(str(rng_file)) if rng_file.is_file() else {}
        return state, meta, rng


def _fill(target: Any, tensors: Any) -> Any:
    """Put loaded tensors back into the target tree (DCP loads in place, but keep plain leaves aligned)."""
    if tensors is None:
        return target
    if isinstance(target, dict):
        for k, v in target.items():
            if str(k) in tensors:
                target[k] = _fill(v, tensors[str(k)])
        return target
    if isinstance(target, list):
        for i, v in enumerate(target):
            if str(i) in tensors:
                target[i] = _fill(v, tensors[str(i)])
        return target
    return tensors
