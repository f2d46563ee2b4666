"""Rebuild a model from a checkpoint in one process; ``expertrain export native`` and the formats plugins provide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from framework.checkpoint.store import CheckpointStore
from framework.config import JobConfig, resolve
from framework.hooks import PluginManager
from framework.models import default_registry


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


def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, JobConfig, PluginManager, Path]:
    """The trained model (fp32, CPU) of a checkpoint, with the plugins of its job re-applied."""
    from framework.models import Transformer

    path = resolve_checkpoint(checkpoint)
    meta = CheckpointStore.read_meta(path)
    raw = meta["config"]
    pm = PluginManager(default_registry())
    pm.load(list(raw.get("plugins", [])))
    config = resolve(raw, pm.config_sections, source=str(path))
    # Plugins keep what their blocks need when they validate the job (as in training, with the saved world size).
    pm.hook.expertrain_validate_config(config=config, world_size=int(meta.get("world_size", 1)))
    model = Transformer(config.model, config.moe, pm.registry)
    # Every value is overwritten from the checkpoint; initialised weights keep the plugins' decompositions in the
    # transform (SVDs of the base) on finite numbers.
    model.init_weights(config.train.seed)
    pm.hook.expertrain_transform_model(model=model, config=config)
    target = {"model": model.state_dict(), "plugins": pm.plugin_state_dicts(model, config)}
    state, _, _ = CheckpointStore.load(path, target)
    model.load_state_dict(state["model"])
    pm.load_plugin_state_dicts(state.get("plugins", {}), model, config)
    model.eval()
    return model, config, pm, path


def export_native(checkpoint: str | Path, output: str | Path) -> list[str]:
    """Write ``model.safetensors`` + ``config.yaml`` (+ the run's tokenizer) to ``output``."""
    model, config, pm, path = load_model(checkpoint)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "expertrain-native"})
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    written = ["model.safetensors", "config.yaml"]
    tokenizer_dir = path.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, out / f.name)
            written.append(f.name)
    for result in pm.hook.expertrain_export(
        model=model, config=config, output_dir=out, export_format="native"
    ):
        written.extend(result or [])
    (out / "export.json").write_text(
        json.dumps({"checkpoint": path.name, "files": written}, indent=1), encoding="utf-8"
    )
    return written


class ExportFormatUnavailable(ValueError):
    """No plugin of the checkpoint's job provides the requested export format."""


def export_plugin_format(checkpoint: str | Path, output: str | Path, export_format: str) -> list[str]:
    """``expertrain export <format>`` for a format a plugin provides through ``expertrain_export``.

    The model is rebuilt with the checkpoint's plugins (:func:`load_model`); the core writes nothing of its own for
    such a format. Raises :class:`ExportFormatUnavailable` (before anything is written) when no plugin answers.
    """
    model, config, pm, path = load_model(checkpoint)
    out = Path(output)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    answers = pm.call_per_plugin(
        "expertrain_export", model=model, config=config, output_dir=out, export_format=export_format
    )
    if not answers:
        if not existed:
            out.rmdir()
        plugins = ", ".join(config.plugins) if config.plugins else "none"
        raise ExportFormatUnavailable(
            f"export format '{export_format}' is not available for {path}: no plugin of its job provides it "
            f"(plugins: {plugins}); 'native' is always available"
        )
    written = [name for files in answers.values() for name in files]
    (out / "export.json").write_text(
        json.dumps(
            {"checkpoint": path.name, "format": export_format, "plugins": list(answers), "files": written},
            indent=1,
        ),
        encoding="utf-8",
    )
    return written


def export_hf(checkpoint: str | Path, output: str | Path, *, merge: bool = False) -> list[str]:
    """``expertrain export hf``: the checkpoint's model as a folder ``transformers.AutoModelForCausalLM`` loads
    (``config.json``, safetensors, the run's tokenizer). ``merge``: plugins first fold their adapters into the base
    weights (``expertrain_merge_adapters``). Written to a temporary sibling and renamed, so a failed export leaves no
    half-written folder and an existing ``output`` is replaced only by a complete one."""
    from framework.data.errors import DataError
    from framework.interop.hf import HFCheckpointError, HFConfigError, save_pretrained
    from framework.interop.hf.tokenizer import load_hf_tokenizer

    model, config, pm, path = load_model(checkpoint)
    merged = pm.call_per_plugin("expertrain_merge_adapters", model=model, config=config) if merge else {}
    tokenizer_dir = path.parent.parent / "tokenizer"
    tokenizer = None
    if tokenizer_dir.is_dir():
        try:
            tokenizer = load_hf_tokenizer(tokenizer_dir)
        except DataError:
            tokenizer = None
    out = Path(output)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = save_pretrained(model, staging, tokenizer=tokenizer)
    except (HFCheckpointError, HFConfigError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if config.plugins and not merge:
            raise HFCheckpointError(
                f"{exc} (the job's plugins {', '.join(config.plugins)} may add tensors: pass --merge to fold "
                "mergeable adapters into the base weights, or export the adapters with their own format)"
            ) from None
        raise
    (staging / "export.json").write_text(
        json.dumps(
            {"checkpoint": path.name, "format": "hf", "merged": {k: list(v) for k, v in merged.items()},
             "files": written},
            indent=1,
        ),
        encoding="utf-8",
    )  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return written
