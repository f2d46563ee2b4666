"""Exports of a checkpoint: ``expertrain export native|hf`` and the formats plugins provide.

No export holds the whole model. When no plugin of the checkpoint's job changes the built model or exports from it
(:func:`streams_tensors`: the core model, or plugins that only provide blocks or observe training, like
``deepseek_moe`` and the watchdog), the model is built on the ``meta`` device (names, shapes, dtypes and the modules
the HF config is read from, no data), its tensors are read from the checkpoint one at a time and written to their
safetensors files as they come (:mod:`framework.checkpoint.stream`), so peak memory is about one tensor.

Otherwise the job's model is built and transformed by its plugins on ``meta`` (:class:`~framework.checkpoint.partial.
PartialModel`) and only what the export reads is loaded: the tensors plugins added (adapters, masks), the trainable
ones and what a plugin declares (``expertrain_export_tensors``); plugin formats (``export peft``, ``lift``, ...)
are written from that model, ``native`` and ``hf`` stream the base weights past it, and ``hf --merge`` folds the
adapters into each base tensor as it streams (``expertrain_merge_tensor``). Only a plugin whose transform needs real
weights, or a merge by a plugin that implements only ``expertrain_merge_adapters``, rebuilds the whole model
(:func:`load_model`). Every path writes the same bytes.
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

from framework.checkpoint.partial import TIED, PartialModel, reading_base_weights_is_an_error
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


def _write_native_weights(out: Path, source: _StreamedModel | PartialModel) -> None:
    """``model.safetensors`` from the checkpoint, tensor by tensor (the bytes ``save_file`` of the state dict gives)."""
    entries = [TensorEntry(name, source.dtypes[name], tuple(shape)) for name, shape in source.shapes.items()]
    with SafetensorsWriter(out / NATIVE_WEIGHTS, entries, NATIVE_METADATA) as writer:
        for entry in entries:
            writer.write(entry.name, source.load(entry.name))


def export_native(
    checkpoint: str | Path, output: str | Path, *, overwrite: bool = False, whole_model: bool = False
) -> list[str]:
    """Write ``model.safetensors`` + ``config.yaml`` (+ the run's tokenizer, + what plugins export) to ``output``.
    ``output`` is checked first (:func:`prepare_output`); with ``overwrite`` a previous export's files are removed.

    Streamed from the checkpoint: without building the model when :func:`streams_tensors`, else past the job's
    model with only its plugins' tensors loaded (:class:`PartialModel`). ``whole_model``: rebuild the whole model
    first (:func:`load_model`, the path before streaming; the same bytes)."""
    out = prepare_output(output, overwrite=overwrite)
    config, pm, path = checkpoint_job(checkpoint)
    source: _StreamedModel | PartialModel | None = None
    model = None
    if streams_tensors(pm) and not whole_model:
        source = _StreamedModel(path, config, pm)
    elif whole_model or pm.transforms_needing_weights():
        model, config, pm, path = load_model(path)
    else:
        source = PartialModel(path, config, pm, "native")
        model = source.model
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_export(out)
    if source is not None:
        _write_native_weights(out, source)
    else:
        assert model is not None
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
        with reading_base_weights_is_an_error("expertrain_export"):
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
    checkpoint: str | Path,
    output: str | Path,
    export_format: str,
    *,
    overwrite: bool = False,
    whole_model: bool = False,
) -> list[str]:
    """``expertrain export <format>`` for a format a plugin provides through ``expertrain_export``.

    The plugins export from the job's model with only what they read loaded (:class:`PartialModel`: their own
    tensors, the trainable ones and those they declare), or, when a plugin's transform needs real weights or
    ``whole_model``, from the whole model rebuilt (:func:`load_model`); the same bytes either way. The core writes
    nothing of its own for such a format. Raises :class:`ExportFormatUnavailable` (before anything is written) when
    no plugin answers. ``output`` is checked first (:func:`prepare_output`); with ``overwrite`` a previous
    export's files are removed.
    """
    out = prepare_output(output, overwrite=overwrite)
    config, pm, path = checkpoint_job(checkpoint)
    if whole_model or pm.transforms_needing_weights():
        model, config, pm, path = load_model(path)
    else:
        model = PartialModel(path, config, pm, export_format).model
    with _staged(out) as staging:
        with reading_base_weights_is_an_error("expertrain_export"):
            answers = pm.call_per_plugin(
                "expertrain_export",
                model=model,
                config=config,
                output_dir=staging,
                export_format=export_format,
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


def merges_per_tensor(pm: PluginManager) -> bool:
    """Whether ``export hf --merge`` can stream: every plugin that changes the model implements
    ``expertrain_merge_tensor`` and none needs real weights to transform it."""
    changing = [n for n in pm.plugin_names if MODEL_HOOKS.intersection(pm.hooks_implemented(n))]
    return not pm.transforms_needing_weights() and all(
        "expertrain_merge_tensor" in pm.hooks_implemented(n) for n in changing
    )


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    merge: bool = False,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    whole_model: bool = False,
) -> list[str]:
    """``expertrain export hf``: the checkpoint's model as a folder ``transformers.AutoModelForCausalLM`` loads
    (``config.json``, safetensors, the run's tokenizer). ``merge``: plugins first fold their adapters into the base
    weights. Written to a temporary sibling and then moved in, so a failed export leaves no half-written folder. An
    existing non-empty ``output`` is refused unless ``overwrite``; with it, only a previous export's files are
    replaced, anything else in the folder is kept (:func:`prepare_output`). ``max_shard_bytes``: the largest
    safetensors file (transformers' 5 GB by default).

    Streamed from the checkpoint, shard file by shard file: without building the model when
    :func:`streams_tensors`; else past the job's model with only its plugins' tensors loaded
    (:class:`PartialModel`), a merge folding the adapters into each base tensor as it is written
    (``expertrain_merge_tensor``, :func:`merges_per_tensor`). A merge by a plugin that implements only
    ``expertrain_merge_adapters``, or ``whole_model``, writes from the whole model :func:`load_model` rebuilds (the
    path before streaming; the same bytes)."""
    from framework.data.errors import DataError
    from framework.interop.hf import HFCheckpointError, HFConfigError, save_pretrained
    from framework.interop.hf.folders import DEFAULT_MAX_SHARD_BYTES
    from framework.interop.hf.tokenizer import load_hf_tokenizer

    out = prepare_output(output, overwrite=overwrite)
    config, pm, path = checkpoint_job(checkpoint)
    model = None
    partial: PartialModel | None = None
    merged: dict[str, Any] = {}
    if whole_model or (
        not streams_tensors(pm) and (pm.transforms_needing_weights() or merge and not merges_per_tensor(pm))
    ):
        model, config, pm, path = load_model(path)
        if merge:
            merged = pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config)
    elif not streams_tensors(pm):
        partial = PartialModel(path, config, pm, "hf", plugin_state=merge)
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
            elif partial is None:
                source = _StreamedModel(path, config, pm)
                written = _write_hf_streamed(source.skeleton, source.shapes, source.dtypes, source.load,
                                             staging, tokenizer, shard)  # fmt: skip
            elif merge:
                merger = _TensorMerger(partial)
                base = partial.base.state_dict()
                written = _write_hf_streamed(
                    partial.base,
                    {k: v.shape for k, v in base.items()},
                    {k: v.dtype for k, v in base.items()},
                    merger.load,
                    staging,
                    tokenizer,
                    shard,
                )
                merged = merger.merged
            else:
                written = _write_hf_streamed(partial.model, partial.shapes, partial.dtypes, partial.load,
                                             staging, tokenizer, shard)  # fmt: skip
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


class _TensorMerger:
    """Each base tensor of a merged export, read from the checkpoint with the plugins' adapters folded in
    (``expertrain_merge_tensor``, plugin by plugin in hook order); ``merged`` records, per plugin, the modules whose
    tensors it changed (as ``expertrain_merge_adapters`` reports them)."""

    def __init__(self, partial: PartialModel) -> None:
        self.partial = partial
        self.merged: dict[str, list[str]] = {}

    def load(self, name: str) -> torch.Tensor:
        p = self.partial
        tensor = p.load(name)
        if name in p.loaded:
            tensor = tensor.clone()  # a tensor the model holds (a trainable one) is not merged in place
        tied = p.config.model.tie_embeddings and name in TIED
        for alias in TIED if tied else (name,):  # a tied head's adapters fold into the shared tensor too
            with reading_base_weights_is_an_error("expertrain_merge_tensor"):
                answers = p.pm.call_per_plugin(
                    "expertrain_merge_tensor", model=p.model, config=p.config, name=alias, tensor=tensor
                )
            for plugin, result in answers.items():
                if result.dtype != tensor.dtype or result.shape != tensor.shape:
                    raise CheckpointFormatError(
                        f"plugin '{plugin}' returned a {result.dtype} {tuple(result.shape)} tensor from "
                        f"expertrain_merge_tensor for '{alias}', which is {tensor.dtype} {tuple(tensor.shape)}"
                    )
                tensor = result
                module = alias.rpartition(".")[0]
                paths = self.merged.setdefault(plugin, [])
                if module not in paths:
                    paths.append(module)
        return tensor


def _write_hf_streamed(
    skeleton: torch.nn.Module,
    shapes: dict[str, torch.Size],
    dtypes: dict[str, torch.dtype],
    load: Any,
    out: Path,
    tokenizer: Any,
    max_shard_bytes: int,
) -> list[str]:
    """:func:`~framework.interop.hf.save_pretrained` of a model known by its ``meta`` skeleton (modules, the
    config's dtype) and ``load(name)`` giving each tensor's values in turn."""
    from framework.interop.hf.folders import spec_from_model, write_pretrained

    return write_pretrained(
        spec_from_model(skeleton),
        shapes,
        dtypes,
        load,
        out,
        dtype=next(p.dtype for p in skeleton.parameters()),
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer,
    )
