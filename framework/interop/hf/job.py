"""``model.init_from: hf:<folder>`` in a job file: the model's shape, plugins and tokenizer come from the folder.

:func:`apply_hf_init` runs on the raw job (before typing, so plugin sections can be added): the ``model``, ``moe``
and plugin sections of the Hugging Face config (:func:`~framework.interop.hf.hf_config_to_job_sections`) fill the
job, the plugins the family needs join ``plugins`` (e.g. ``deepseek_moe`` for qwen2_moe and deepseek_v3), and
``data.tokenizer`` defaults to the folder when it holds a ``tokenizer.json``. A value the job sets itself must agree
with the checkpoint, except the training choices in :data:`JOB_CHOICES` (sequence length, losses, kernels), which the
job may change. The weights are loaded by the trainer into the unsharded model before it is parallelised, so any
layout works (:func:`~framework.interop.hf.load_hf_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.config.errors import ConfigError

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
"""Keys of the HF-derived sections a job may set to other values: how to train, not what the model computes."""


def hf_folder(init_from: object) -> Path | None:
    """The folder of an ``hf:<folder>`` value, else None."""
    if isinstance(init_from, str) and init_from.startswith(HF_PREFIX):
        return Path(init_from[len(HF_PREFIX) :])
    return None


def apply_hf_init(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw job with the checkpoint's model sections merged in (unchanged without ``hf:``); raises
    :class:`ConfigError` naming the first job value that contradicts the checkpoint."""
    folder = hf_folder(raw.get("model", {}).get("init_from"))
    if folder is None:
        return raw
    from framework.interop.hf import hf_config_to_job_sections

    if not (folder / "config.json").is_file():
        raise ConfigError(
            KEY,
            f"{HF_PREFIX}{folder}",
            "expected a Hugging Face model folder with config.json and safetensors",
        )
    sections = hf_config_to_job_sections(folder)
    merged = dict(raw)
    for name, values in sections.items():
        if name == "plugins":
            continue
        section = dict(merged.get(name) or {})
        choices = JOB_CHOICES.get(name, frozenset())
        for key, value in values.items():
            if key in section and key not in choices and section[key] != value:
                raise ConfigError(
                    f"{name}.{key}",
                    section[key],
                    f"the Hugging Face checkpoint {folder} has {value!r}; remove {name}.{key} from the job (the "
                    "model's shape comes from the checkpoint)",
                )
            section.setdefault(key, value)
        merged[name] = section
    plugins = list(merged.get("plugins") or [])
    merged["plugins"] = plugins + [p for p in sections.get("plugins", []) if p not in plugins]
    data = dict(merged.get("data") or {})
    if not data.get("tokenizer") and (folder / "tokenizer.json").is_file():
        data["tokenizer"] = str(folder)
        merged["data"] = data
    return merged
