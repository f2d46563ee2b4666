"""``model.init_from`` in a job file: the model's shape (and plugins, tokenizer) come from the source it names.

:func:`apply_hf_init` runs on the raw job (before typing, so plugin sections can be added) and fills the job's
``model`` and ``moe`` sections (and the sections of the plugins the model needs) from the source:

- ``hf:<folder>``: the Hugging Face config (:func:`~framework.interop.hf.hf_config_to_job_sections`: ``model`` and
  ``moe``, every family built from core components), and ``data.tokenizer`` defaults to the folder when it holds a
  ``tokenizer.json``.
- an earlier run (its folder, its ``checkpoints`` folder or one ``step_XXXXXXXX`` checkpoint): that run's saved job
  (``config.yaml``, or the checkpoint's ``meta.json``): its ``model`` and ``moe`` sections, the plugins that provide
  a component the model names (``moe.block``, ``moe.router``, ``model.attention``, e.g. ``deepseek_moe``) with
  their sections, and its ``data.tokenizer``. Adapters of the base run (``lora`` ...) are not carried over. A source
  that does not exist yet is left alone (loading it fails later, naming it).

A value the job sets itself must agree with the source, except the training choices in :data:`JOB_CHOICES` (sequence
length, losses, kernels), which the job may change. The weights are loaded into this rank's shards of the model, any
layout (:func:`~framework.checkpoint.warm_start.load_model_weights`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from framework.config.errors import ConfigError
from framework.config.job import yaml_load

HF_PREFIX = "hf:"
KEY = "model.init_from"

JOB_CHOICES: dict[str, frozenset[str]] = {
    "model": frozenset({"max_seq_len", "init_std", "init_from"}),
    "moe": frozenset(
        {
            "aux_loss_coef",
            "seq_aux_loss_coef",
            "z_loss_coef",
            "bias_update_rate",
            "capacity_factor",
            "drop_policy",
            "experts_impl",
        }
    ),
}
"""Keys of the source-derived sections a job may set to other values: how to train, not what the model computes."""

RUN_CONFIG = "config.yaml"
CHECKPOINT_META = "meta.json"


def hf_folder(init_from: object) -> Path | None:
    """The folder of an ``hf:<folder>`` value, else None."""
    if isinstance(init_from, str) and init_from.startswith(HF_PREFIX):
        return Path(init_from[len(HF_PREFIX) :])
    return None


def apply_hf_init(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw job with the model sections of ``model.init_from``'s source merged in (unchanged without one); raises
    :class:`ConfigError` naming the first job value that contradicts the source."""
    init_from = (raw.get("model") or {}).get("init_from")
    folder = hf_folder(init_from)
    if folder is not None:
        return _merge(raw, _hf_sections(folder), f"the Hugging Face checkpoint {folder}")
    if isinstance(init_from, str) and init_from:
        saved = _saved_run_job(Path(init_from))
        if saved is not None:
            return _merge(raw, _run_sections(saved), f"the run {init_from}")
    return raw


def _hf_sections(folder: Path) -> dict[str, Any]:
    from framework.interop.hf import hf_config_to_job_sections

    if not (folder / "config.json").is_file():
        raise ConfigError(
            KEY,
            f"{HF_PREFIX}{folder}",
            "expected a Hugging Face model folder with config.json and safetensors",
        )
    sections = hf_config_to_job_sections(folder)
    if (folder / "tokenizer.json").is_file():
        sections["data"] = {"tokenizer": str(folder)}
    return sections


def _saved_run_job(path: Path) -> dict[str, Any] | None:
    """The job a run saved: ``config.yaml`` of a run folder (or of the run above its ``checkpoints`` folder), or
    the config in a checkpoint's ``meta.json``; None where there is none."""
    for config in (path / RUN_CONFIG, path.parent / RUN_CONFIG if path.name == "checkpoints" else None):
        if config is not None and config.is_file():
            return _read_mapping(config, yaml_load)
    meta = path / CHECKPOINT_META
    if meta.is_file():
        return _read_mapping(meta, json.loads).get("config") or {}
    return None


def _read_mapping(file: Path, parse: Any) -> dict[str, Any]:
    try:
        value = parse(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(KEY, str(file), f"cannot read the saved job ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(KEY, str(file), "expected a mapping (the job a run saved)")
    return value


def _run_sections(saved: dict[str, Any]) -> dict[str, Any]:
    """``plugins``, ``model``, ``moe``, the needed plugins' sections and ``data.tokenizer`` of a saved job."""
    model = {k: v for k, v in (saved.get("model") or {}).items() if k != "init_from"}
    moe = dict(saved.get("moe") or {})
    components = {model.get("attention"), moe.get("block"), moe.get("router")}
    plugins = [name for name in saved.get("plugins") or [] if name in components]
    sections: dict[str, Any] = {"plugins": plugins, "model": model, "moe": moe}
    sections.update({name: dict(saved.get(name) or {}) for name in plugins})
    tokenizer = (saved.get("data") or {}).get("tokenizer")
    if tokenizer:
        sections["data"] = {"tokenizer": tokenizer}
    return sections


def _merge(raw: dict[str, Any], sections: dict[str, Any], source: str) -> dict[str, Any]:
    """``raw`` with ``sections`` filled in where the job is silent; ``data.tokenizer`` only where the job has none."""
    merged = dict(raw)
    for name, values in sections.items():
        if name in ("plugins", "data"):
            continue
        section = dict(merged.get(name) or {})
        choices = JOB_CHOICES.get(name, frozenset())
        for key, value in values.items():
            if key in section and key not in choices and section[key] != value:
                raise ConfigError(
                    f"{name}.{key}",
                    section[key],
                    f"{source} has {value!r}; remove {name}.{key} from the job (the model's shape comes from the "
                    "checkpoint)",
                )
            section.setdefault(key, value)
        merged[name] = section
    plugins = list(merged.get("plugins") or [])
    merged["plugins"] = plugins + [p for p in sections.get("plugins", []) if p not in plugins]
    data = dict(merged.get("data") or {})
    tokenizer = sections.get("data", {}).get("tokenizer")
    if tokenizer and not data.get("tokenizer"):
        data["tokenizer"] = tokenizer
        merged["data"] = data
    return merged
