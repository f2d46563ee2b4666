"""Exports of a checkpoint: ``expertrain export native|hf`` and the formats plugins provide.

When no plugin of the checkpoint's job changes the built model or exports from it (:func:`streams_tensors`: the
core model, or plugins that only provide blocks or observe training, like ``deepseek_moe`` and the watchdog), the
model's weights are never materialised: the model is built on the ``meta`` device (names, shapes, dtypes and the
modules the HF config is read from, no data), its tensors are read from the checkpoint one at a time and written to
their safetensors files as they come (:mod:`framework.checkpoint.stream`), so peak memory is about one tensor.
Otherwise (adapters, ``--merge`` with a merging plugin, plugin formats) :func:`load_model` rebuilds the whole model
in one process, as a training rank would, and the export is written from it. Both give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from framework.checkpoint.safe_reader import CheckpointFormatError
from framework.checkpoint.store import CheckpointStore
from framework.checkpoint.stream import CheckpointTensors, SafetensorsWriter, TensorEntry
from framework.config import JobConfig, resolve
from framework.hooks import PluginManager
from framework.models import default_registry

NATIVE_WEIGHTS = "model.safetensors"
NATIVE_METADATA = {"format": "expertrain-native"}
MODEL_HOOKS = frozenset(
    {
        "expertrain_transform_model",
        "expertrain_load_state_dict",
        "expertrain_merge_adapters",
        "expertrain_export",
    }
)
"""Hooks that need the built model at export time: a plugin implementing one keeps the export on :func:`load_model`."""


EXPORT_RECORD = "export.json"
"""The file every export writes last: the checkpoint it came from and the ``files`` it wrote."""


class ExportOutputError(ValueError):
    """The export's output path cannot take the export: a file, a read-only folder, or a non-empty folder without
    ``overwrite``."""


def prepare_output(output: str | Path, *, overwrite: bool) -> Path:
    """Check ``output`` before anything is exported and return it as a path. Never deletes what the user did not ask
    to delete: a non-empty folder is refused unless ``overwrite``; with it, only the files a previous export listed
    in its ``export.json`` are removed (later, by :func:`remove_previous_export`), every other file is kept."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ExportOutputError(
            f"export output {out} is a file, not a folder: choose a folder path for --output"
        )
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportOutputError(
            f"export output {out} cannot be written ({parent} is read-only): choose another --output"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportOutputError(
            f"export output {out} is not empty: choose an empty folder, or pass --overwrite to replace the files a "
            f"previous export wrote there (other files are kept)"
        )
    return out


def previous_export_files(out: Path) -> list[Path]:
    """The files a previous export into ``out`` wrote (its ``export.json``'s list, then the record itself); names
    that would leave ``out`` are ignored. Empty when there is no readable record."""
    record = out / EXPORT_RECORD
    try:
        names = json.loads(record.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    root = out.resolve()
    files = [out / str(n) for n in names if isinstance(n, str)]
    inside = [f for f in files if f.resolve().parent == root]
    return [*inside, record]


def remove_previous_export(out: Path) -> None:
    """Delete the files a previous export into ``out`` wrote (see :func:`previous_export_files`); nothing else."""
    for f in previous_export_files(out):
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink(missing_ok=True)


def _move_into(staging: Path, out: Path) -> None:
    """Move the staged export into ``out``: a rename when ``out`` does not exist, else file by file (replacing the
    previous export's files, keeping the rest)."""
    if not out.exists():
        staging.rename(out)
        return
    remove_previous_export(out)
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a folder of the same name as one this export writes (e.g. a tokenizer's)
        os.replace(entry, target)
    staging.rmdir()


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write the export into: moved into ``out`` when the block ends, removed when
    it raises, so a failed export leaves no half-written folder."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into(staging, out)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its latest checkpoint) or a run's ``checkpoints`` folder."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = CheckpointStore(root).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no complete checkpoint at {p}: expected a step_XXXXXXXX folder or a run folder that holds checkpoints/"
    )


def checkpoint_job(checkpoint: str | Path) -> tuple[JobConfig, PluginManager, Path]:
    """The checkpoint folder's job config, with its plugins loaded and the job validated by them (as in training,
    with the saved world size)."""
    path = resolve_checkpoint(checkpoint)
    meta = CheckpointStore.read_meta(path)
    raw = meta["config"]
    pm = PluginManager(default_registry())
    pm.load(list(raw.get("plugins", [])))
    config = resolve(raw, pm.config_sections, source=str(path))
    # Plugins keep what their blocks need when they validate the job.
    pm.hook.expertrain_validate_config(config=config, world_size=int(meta.get("world_size", 1)))
    return config, pm, path


def streams_tensors(pm: PluginManager) -> bool:
    """Whether the checkpoint's model tensors are the model, so an export may stream them without building it:
    no enabled plugin implements one of :data:`MODEL_HOOKS`."""
    return not any(MODEL_HOOKS.intersection(pm.hooks_implemented(name)) for name in pm.plugin_names)


def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, JobConfig, PluginManager, Path]:
    """The trained model (fp32, CPU) of a checkpoint, with the plugins of its job re-applied. Builds the whole model
    in this process, through the same assembly as training (:func:`~framework.train.assembly.assemble_model`) on one
    process; every value is then overwritten from the checkpoint."""
    from framework.train.assembly import assemble_single_process

    config, pm, path = checkpoint_job(checkpoint)
    model = assemble_single_process(config, pm).raw
    target = {"model": model.state_dict(), "plugins": pm.plugin_state_dicts(model, config)}
    state, _, _ = CheckpointStore.load(path, target)
    model.load_state_dict(state["model"])
    pm.load_plugin_state_dicts(state.get("plugins", {}), model, config)
    model.eval()
    return model, config, pm, path


class _StreamedModel:
    """A checkpoint's model as an export sees it, without its weights in memory: the job's model built on the
    ``meta`` device (its ``state_dict`` names in order, shapes, dtypes and modules, all an export reads besides the
    values) and each tensor's values loaded from the checkpoint on demand."""

    def __init__(self, path: Path, config: JobConfig, pm: PluginManager) -> None:
        from framework.models import Transformer

        with torch.device("meta"):
            self.skeleton = Transformer(config.model, config.moe, pm.registry)
        state = self.skeleton.state_dict()
        self.shapes = {name: t.shape for name, t in state.items()}
        self.dtypes = {name: t.dtype for name, t in state.items()}
        self._tensors = CheckpointTensors(path)
        stored = self._tensors.shapes
        self._aliases: dict[str, str] = {}
        if config.model.tie_embeddings and "output.weight" not in stored:
            self._aliases["output.weight"] = "tok_embeddings.weight"  # the tied head, saved once
        for name, shape in self.shapes.items():
            source = self._aliases.get(name, name)
            if stored.get(source) != shape:
                found = f"shape {tuple(stored[source])}" if source in stored else "no such tensor"
                raise CheckpointFormatError(
                    f"{path} does not hold the model its job describes: '{source}' should be {tuple(shape)}, "
                    f"found {found}; export the checkpoint with the job config it was saved with"
                )

    def load(self, name: str) -> torch.Tensor:
        """Our tensor ``name``, whole, in the dtype the model has it."""
        source = self._aliases.get(name, name)
        return self._tensors.load([source], self.dtypes[name])[source]


def _write_native_weights(out: Path, path: Path, config: JobConfig, pm: PluginManager) -> None:
    """``model.safetensors`` from the checkpoint, tensor by tensor (the bytes ``save_file`` of the state dict gives)."""
    source = _StreamedModel(path, config, pm)
    entries = [TensorEntry(name, source.dtypes[name], tuple(shape)) for name, shape in source.shapes.items()]
    with SafetensorsWriter(out / NATIVE_WEIGHTS, entries, NATIVE_METADATA) as writer:
        for entry in entries:
            writer.write(entry.name, source.load(entry.name))


def export_native(checkpoint: str | Path, output: str | Path, *, overwrite: bool = False) -> list[str]:
    """Write ``model.safetensors`` + ``config.yaml`` (+ the run's tokenizer, + what plugins export) to ``output``.
    ``output`` is checked first (:func:`prepare_output`); with ``overwrite`` a previous export's files are removed.

    Streamed from the checkpoint when :func:`streams_tensors`; else from the model :func:`load_model` rebuilds."""
    out = prepare_output(output, overwrite=overwrite)
    config, pm, path = checkpoint_job(checkpoint)
    model = None
    if not streams_tensors(pm):
        model, config, pm, path = load_model(path)
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_export(out)
    if model is None:
        _write_native_weights(out, path, config, pm)
    else:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(out / NATIVE_WEIGHTS), metadata=NATIVE_METADATA)
        del tensors
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    written = [NATIVE_WEIGHTS, "config.yaml"]
    tokenizer_dir = path.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, out / f.name)
            written.append(f.name)
    if model is not None:
        for result in pm.hook.expertrain_export(
            model=model, config=config, output_dir=out, export_format="native"
        ):
            written.extend(result or [])
    (out / EXPORT_RECORD).write_text(
        json.dumps({"checkpoint": path.name, "files": written}, indent=1), encoding="utf-8"
    )
    return written


class ExportFormatUnavailable(ValueError):
    """No plugin of the checkpoint's job provides the requested export format."""


def export_plugin_format(
    checkpoint: str | Path, output: str | Path, export_format: str, *, overwrite: bool = False
) -> list[str]:
    """``expertrain export <format>`` for a format a plugin provides through ``expertrain_export``.

    The model is rebuilt with the checkpoint's plugins (:func:`load_model`); the core writes nothing of its own for
    such a format. Raises :class:`ExportFormatUnavailable` (before anything is written) when no plugin answers.
    ``output`` is checked first (:func:`prepare_output`); with ``overwrite`` a previous export's files are removed.
    """
    out = prepare_output(output, overwrite=overwrite)
    model, config, pm, path = load_model(checkpoint)
    with _staged(out) as staging:
        answers = pm.call_per_plugin(
            "expertrain_export", model=model, config=config, output_dir=staging, export_format=export_format
        )
        if not answers:
            plugins = ", ".join(config.plugins) if config.plugins else "none"
            raise ExportFormatUnavailable(
                f"export format '{export_format}' is not available for {path}: no plugin of its job provides it "
                f"(plugins: {plugins}); 'native' is always available"
            )
        written = [name for files in answers.values() for name in files]
        (staging / EXPORT_RECORD).write_text(
            json.dumps(
                {
                    "checkpoint": path.name,
                    "format": export_format,
                    "plugins": list(answers),
                    "files": written,
                },
                indent=1,
            ),
            encoding="utf-8",
        )
    return written


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    merge: bool = False,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> list[str]:
    """``expertrain export hf``: the checkpoint's model as a folder ``transformers.AutoModelForCausalLM`` loads
    (``config.json``, safetensors, the run's tokenizer). ``merge``: plugins first fold their adapters into the base
    weights (``expertrain_merge_adapters``). Written to a temporary sibling and then moved in, so a failed export
    leaves no half-written folder. An existing non-empty ``output`` is refused unless ``overwrite``; with it, only a
    previous export's files are replaced, anything else in the folder is kept (:func:`prepare_output`).
    ``max_shard_bytes``: the largest safetensors file (transformers' 5 GB by default).

    Streamed from the checkpoint, shard file by shard file, when :func:`streams_tensors`; else written from the
    model :func:`load_model` rebuilds (same bytes)."""
    from framework.data.errors import DataError
    from framework.interop.hf import HFCheckpointError, HFConfigError, save_pretrained
    from framework.interop.hf.folders import DEFAULT_MAX_SHARD_BYTES
    from framework.interop.hf.tokenizer import load_hf_tokenizer

    out = prepare_output(output, overwrite=overwrite)
    config, pm, path = checkpoint_job(checkpoint)
    model = None
    merged: dict[str, Any] = {}
    if not streams_tensors(pm):
        model, config, pm, path = load_model(path)
        if merge:
            merged = pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config)
    tokenizer_dir = path.parent.parent / "tokenizer"
    tokenizer = None
    if tokenizer_dir.is_dir():
        try:
            tokenizer = load_hf_tokenizer(tokenizer_dir)
        except DataError:
            tokenizer = None
    shard = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    with _staged(out) as staging:
        try:
            if model is not None:
                written = save_pretrained(model, staging, tokenizer=tokenizer, max_shard_bytes=shard)
            else:
                written = _write_hf_streamed(path, config, pm, staging, tokenizer, shard)
        except (HFCheckpointError, HFConfigError) as exc:
            if config.plugins and not merge:
                raise HFCheckpointError(
                    f"{exc} (the job's plugins {', '.join(config.plugins)} may add tensors: pass --merge to fold "
                    "mergeable adapters into the base weights, or export the adapters with their own format)"
                ) from None
            raise
        (staging / EXPORT_RECORD).write_text(
            json.dumps(
                {"checkpoint": path.name, "format": "hf", "merged": {k: list(v) for k, v in merged.items()},
                 "files": written},
                indent=1,
            ),
            encoding="utf-8",
        )  # fmt: skip
    return written


def _write_hf_streamed(
    path: Path, config: JobConfig, pm: PluginManager, out: Path, tokenizer: Any, max_shard_bytes: int
) -> list[str]:
    """:func:`~framework.interop.hf.save_pretrained` of the checkpoint's model, its weights streamed."""
    from framework.interop.hf.folders import spec_from_model, write_pretrained

    source = _StreamedModel(path, config, pm)
    return write_pretrained(
        spec_from_model(source.skeleton),
        source.shapes,
        source.dtypes,
        source.load,
        out,
        dtype=next(p.dtype for p in source.skeleton.parameters()),
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer,
    )
