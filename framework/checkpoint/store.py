"""Resumable checkpoints on disk: durable, verified on resume, pointed to by ``latest``, the last N kept.

Layout under ``run.dir/checkpoints/``::

    step_00000010/          a complete checkpoint
        .metadata, *.distcp torch distributed checkpoint of tensors (model, optimizer, plugin tensors)
        rng_rank{r}.safetensors   per-rank RNG states
        meta.json           step, plain values, config fingerprint
        manifest.json       every other file's size and CRC-32, meta.json's keys, the world size (manifest.py)
    latest                  the name of the newest complete checkpoint, replaced atomically after it is in place

A save writes into ``step_XXXXXXXX.tmp``. Every rank fsyncs and fingerprints the files it wrote; rank 0 then writes
``meta.json`` and ``manifest.json`` (fsynced), fsyncs the folder, renames it to ``step_XXXXXXXX`` and fsyncs
``checkpoints/``, and only then replaces ``latest`` the same way. A save killed at any moment (or a power loss) leaves
either the previous checkpoint or the new one complete on disk, never a visible folder with torn files. A save that
fails on any rank removes its temporary folder and names the cause in one line (:class:`CheckpointSaveError`).

On resume :meth:`CheckpointStore.latest_verified` checks the newest checkpoint against its manifest and falls back to
the previous complete one (``checkpoint.on_damaged: fallback``) or refuses (``fail``), naming the damaged file.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from framework.checkpoint.manifest import (
    FileRecord,
    check_files,
    fingerprint,
    fsync_path,
    read_manifest,
    replace_durably,
    write_durably,
    write_manifest,
)
from framework.checkpoint.safe_reader import CheckpointFormatError, SafeFileSystemReader
from framework.checkpoint.tree import overlay_plain, split_tensors
from framework.comm import collectives as C
from framework.observe import console

META = "meta.json"
LATEST = "latest"
FORMAT_VERSION = 1
DAMAGED_SUFFIX = ".damaged"
STORE_META_KEYS = ("format_version", "step", "plain")
"""Keys of ``meta.json`` the store itself writes and reads."""

OnDamaged = Literal["fallback", "fail"]

# Below this much free space after a failed write, the failure is reported as a full disk: torch's zip writer
# (inside DCP) loses the errno and only says "unexpected pos".
_NEARLY_FULL_BYTES = 64 << 20


class CheckpointSaveError(RuntimeError):
    """A save that failed (on any rank); its temporary folder is removed and the previous checkpoint stays."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    """Checkpoints of one run folder.

    ``required_meta``: keys of ``meta.json`` a resume needs besides the store's own (e.g. ``samples_consumed``);
    :meth:`verify` reports a checkpoint lacking one as damaged.
    """

    def __init__(self, root: Path, keep_last: int = 2, required_meta: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.required_meta = tuple(required_meta)

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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(
                f"{path} is not a complete expertrain checkpoint ({META} unreadable: {exc}); "
                "point --checkpoint at a step_XXXXXXXX folder or a run folder"
            ) from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            found = meta.get("format_version") if isinstance(meta, dict) else None
            raise CheckpointFormatError(f"{path} has checkpoint format {found}, expected {FORMAT_VERSION}")
        return meta

    # --- verification ---------------------------------------------------------------------------------------------

    def verify(self, path: Path, part: int = 0, parts: int = 1) -> str | None:
        """None when the checkpoint at ``path`` is intact, else one line naming the first damaged file.

        With a manifest: ``meta.json`` parses and has its keys, and every listed file exists with the recorded size
        and CRC-32. ``part``/``parts`` split the per-file checks among ranks (rank r checks every parts-th file
        from r). Without one (a checkpoint saved before manifests): ``meta.json``, DCP's ``.metadata``, every shard
        it references at least as long as its last item, and an RNG file for each rank of the saved world size;
        bytes changed inside a shard go unnoticed there.
        """
        path = Path(path)
        if not path.is_dir():
            return f"{path}: missing"
        try:
            manifest = read_manifest(path)
        except ValueError as exc:
            return str(exc)
        meta_problem, meta = self._check_meta(path, manifest)
        if meta_problem is not None:
            return meta_problem
        if manifest is None:
            return self._check_unlisted(path, meta) if part == 0 else None
        files = manifest["files"]
        return check_files(path, files, sorted(files)[part::parts])

    def _check_meta(self, path: Path, manifest: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
        meta_path = path / META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{meta_path}: missing", {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{meta_path}: unreadable ({exc})", {}
        if not isinstance(meta, dict):
            return f"{meta_path}: not a JSON object", {}
        expected = {*STORE_META_KEYS, *self.required_meta, *((manifest or {}).get("meta_keys") or [])}
        missing = sorted(expected - meta.keys())
        if missing:
            return f"{meta_path}: lacks {', '.join(missing)}", meta
        if meta["format_version"] != FORMAT_VERSION:
            return f"{meta_path}: format {meta['format_version']}, expected {FORMAT_VERSION}", meta
        return None, meta

    @staticmethod
    def _check_unlisted(path: Path, meta: dict[str, Any]) -> str | None:
        """What can be checked of a checkpoint without a manifest."""
        try:
            metadata = SafeFileSystemReader(str(path)).read_metadata()
        except FileNotFoundError:
            return f"{path / '.metadata'}: missing"
        except (CheckpointFormatError, OSError, ValueError) as exc:
            return f"{path / '.metadata'}: {exc}"
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            shard = path / name
            if not shard.is_file():
                return f"{shard}: missing (.metadata references it)"
            if shard.stat().st_size < end:
                return f"{shard}: {shard.stat().st_size} bytes, .metadata needs at least {end} (truncated)"
        world = meta.get("world_size")
        for r in range(world if isinstance(world, int) else 0):
            rng = path / f"rng_rank{r}.safetensors"
            if not rng.is_file():
                return f"{rng}: missing (saved by {world} ranks)"
        return None

    def latest_verified(self, on_damaged: OnDamaged = "fallback") -> Path | None:
        """Collective: the newest intact checkpoint (None when there is none), every rank agreeing.

        Candidates are the complete folders, newest first (a save killed after its rename but before ``latest`` was
        replaced left a complete, synced folder: it is used). Each rank checks a share of the files of a candidate
        (see :meth:`verify`) and the verdicts are gathered; ``latest`` is then made to name the one used. A damaged
        candidate raises :class:`CheckpointFormatError` naming the file with ``on_damaged="fail"``; with
        ``"fallback"`` it is reported in a warning, and once an older intact one is found, every damaged newer one is
        renamed ``step_XXXXXXXX.damaged`` (kept for inspection) and ``latest`` names the one used. When every
        candidate is damaged nothing is moved and the error names the newest damage.
        """
        if on_damaged not in ("fallback", "fail"):
            raise ValueError(f"checkpoint.on_damaged must be fallback or fail, got {on_damaged!r}")
        names: list[str] = C.run_on_rank0("listing the checkpoints", self._candidates)
        damaged: list[tuple[Path, str]] = []
        for name in names:
            path = self.root / name
            problem = self._verify_on_every_rank(path)
            if problem is None:
                C.run_on_rank0("settling on a checkpoint", partial(self._settle, damaged, path))
                return path
            if on_damaged == "fail":
                raise CheckpointFormatError(
                    f"checkpoint {name} is damaged: {problem}; set checkpoint.on_damaged=fallback to resume from "
                    "the previous complete checkpoint, or move the damaged folder away"
                )
            console.warn(f"checkpoint {name} is damaged: {problem}; trying the previous one")
            damaged.append((path, problem))
        if damaged:
            raise CheckpointFormatError(
                f"no intact checkpoint in {self.root}: all {len(damaged)} are damaged, the newest "
                f"{damaged[0][0].name} at {damaged[0][1]}; restore a copy, or start over with another run.dir or "
                "checkpoint.resume=false"
            )
        return None

    def _candidates(self) -> list[str]:
        return [p.name for p in reversed(self.complete())]

    def _verify_on_every_rank(self, path: Path) -> str | None:
        mine = C.run_agreed(
            f"verifying {path.name}", lambda: self.verify(path, part=C.rank(), parts=C.world_size())
        )
        return next((v for v in C.all_gather_objects(mine) if v is not None), None)

    def _settle(self, damaged: list[tuple[Path, str]], used: Path) -> None:
        """Rank 0: damaged checkpoints renamed aside, ``latest`` naming the one used."""
        for path, _ in damaged:
            aside = path.with_name(path.name + DAMAGED_SUFFIX)
            if aside.exists():
                shutil.rmtree(aside)
            replace_durably(path, aside)
        pointer = self.root / LATEST
        if not pointer.is_file() or pointer.read_text(encoding="utf-8").strip() != used.name:
            self._point_latest(used)
        if damaged:
            moved = ", ".join(p.name + DAMAGED_SUFFIX for p, _ in damaged)
            console.warn(
                f"resuming from {used.name}; the damaged checkpoint is kept as {moved} (delete it when done)"
            )

    def _point_latest(self, checkpoint: Path) -> None:
        pointer_tmp = self.root / (LATEST + ".tmp")
        write_durably(pointer_tmp, checkpoint.name)
        replace_durably(pointer_tmp, self.root / LATEST)

    # --- save -----------------------------------------------------------------------------------------------------

    def save(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], rng: dict[str, torch.Tensor]
    ) -> Path:
        """Collective: every rank calls it with its shard of ``state`` (nested tensors and plain values).

        Raises :class:`CheckpointSaveError` on every rank when writing failed on any; the temporary folder is then
        gone and ``latest`` still names the previous checkpoint."""
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        tensors, plain = split_tensors(state)
        C.run_on_rank0("preparing the checkpoint folder", lambda: self._start(tmp))
        try:
            mine = C.run_agreed(f"writing {tmp.name}", lambda: self._write_own_files(tmp, tensors, rng))
            records: dict[str, FileRecord] = {}
            for written in C.all_gather_objects(mine):
                records.update({name: FileRecord(*r) for name, r in written.items()})
            full_meta = {"format_version": FORMAT_VERSION, "step": step, "plain": plain, **meta}
            C.run_on_rank0(f"completing {final.name}", lambda: self._commit(tmp, final, records, full_meta))
        except BaseException as exc:
            if C.is_collective_failure(exc) or not isinstance(exc, (Exception, CheckpointException)):
                raise  # a lost peer (the watchdog names it) or an interrupt; the next save removes the folder
            free = C.run_on_rank0("removing the failed save", partial(_remove_measuring_free, tmp))
            raise CheckpointSaveError(self._failure_line(final, tmp, exc, free)) from exc
        C.barrier()
        return final

    def _start(self, tmp: Path) -> None:
        """A fresh temporary folder; the leftovers of killed saves go first (they may hold the space needed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir()

    @staticmethod
    def _write_own_files(tmp: Path, tensors: Any, rng: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
        """This rank's shards and RNG file, fsynced; returns {file name: (size, crc32)} of what it wrote."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors or {}, checkpoint_id=tmp, no_dist=not C.is_distributed())
        rank = C.rank()
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / f"rng_rank{rank}.safetensors"))
        # DCP names a rank's shards __{rank}_{n}.distcp; its coordinator (rank 0) writes .metadata.
        own = [tmp / f"rng_rank{rank}.safetensors", *tmp.glob(f"__{rank}_*.distcp")]
        if rank == 0:
            own.append(tmp / ".metadata")
        written = {}
        for path in own:
            fsync_path(path)
            record = fingerprint(path)
            written[path.name] = (record.size, record.crc32)
        return written

    def _commit(self, tmp: Path, final: Path, records: dict[str, FileRecord], meta: dict[str, Any]) -> None:
        """Rank 0: meta.json, the manifest, then the folder and ``latest`` into place, each step on disk."""
        # Files of a writer that names them otherwise (none today) are fsynced and listed all the same.
        for path in tmp.iterdir():
            if path.name not in records and path.is_file():
                fsync_path(path)
                records[path.name] = fingerprint(path)
        write_durably(tmp / META, json.dumps(meta, indent=1))
        records[META] = fingerprint(tmp / META)
        write_manifest(tmp, records, list(meta), C.world_size())
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        replace_durably(tmp, final)
        self._point_latest(final)
        self._prune()

    def _failure_line(self, final: Path, tmp: Path, exc: BaseException, free: int | None) -> str:
        cause = _describe_write_failure(exc, free)
        previous = self.latest()
        kept = f"{previous.name} stays the latest checkpoint" if previous else "no earlier checkpoint exists"
        return f"could not save checkpoint {final.name} in {self.root}: {cause}; removed {tmp.name}, {kept}"

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


def _remove_measuring_free(tmp: Path) -> int | None:
    """Remove a failed save's folder; returns the free bytes on its device before (None if unknown)."""
    try:
        free: int | None = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    shutil.rmtree(tmp, ignore_errors=True)
    return free


def _failure_causes(exc: BaseException) -> list[BaseException]:
    """``exc``, what it was raised from, and the per-rank failures a DCP CheckpointException carries."""
    found: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        if isinstance(current, CheckpointException):
            pending += [f[0] if isinstance(f, tuple) else f for f in current.failures.values()]
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return found


def _describe_write_failure(exc: BaseException, free: int | None) -> str:
    """The cause of a failed save in a few words: a full disk or a file size limit by name, else the error."""
    causes = _failure_causes(exc)
    codes = {c.errno for c in causes if isinstance(c, OSError)}
    text = " ".join(str(c) for c in causes)
    free_note = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left on device" in text or "os error 28" in text:
        return f"no space left on device{free_note}; free space (or lower checkpoint.keep_last) and restart"
    if errno.EFBIG in codes or "File too large" in text or "os error 27" in text:
        return "file too large (EFBIG: the file system's or the process's file size limit, ulimit -f)"
    if "unexpected pos" in text and free is not None and free < _NEARLY_FULL_BYTES:
        return f"a write stopped short: no space left on device{free_note}; free space and restart"
    last = next((c for c in reversed(causes) if not isinstance(c, CheckpointException)), exc)
    return f"{type(last).__name__}: {str(last).strip().splitlines()[-1] if str(last).strip() else ''}"
