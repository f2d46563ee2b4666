"""Whether a checkpoint fits the job about to resume from it: the model's shape settings, every model tensor's
global shape, and a warning when the sample order will differ from the original run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.config import JobConfig
from framework.config.sections import CORE_SECTIONS
from framework.observe import console


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model being trained."""


NOT_SHAPE_KEYS = {("model", "init_from")}
"""``model``/``moe`` keys that do not change the model's shape (a resumed run loads its own weights anyway)."""

ORDER_KEYS = (
    ("train", "seed"),
    ("train", "global_batch_size"),
    ("data", "paths"),
    ("data", "weights"),
    ("data", "seq_len"),
    ("data", "val_fraction"),
)
"""Config keys whose change alters the order in which samples are drawn."""


def check_compatible(meta: dict[str, Any], path: Path, config: JobConfig) -> None:
    """Refuse a checkpoint saved for other ``model`` / ``moe`` shape settings (one line naming up to four keys);
    warn when a key of :data:`ORDER_KEYS` changed."""
    saved = meta.get("config", {})
    now = config.to_dict()
    diffs = [
        f"{section}.{k}: checkpoint {v!r}, config {now[section].get(k)!r}"
        for section in ("model", "moe")
        for k, v in saved.get(section, {}).items()
        if now[section].get(k) != v and (section, k) not in NOT_SHAPE_KEYS
    ]
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {path} was saved for another model shape ({'; '.join(diffs[:4])}); "
            "use the job's original model settings, or start a new run with another run.dir "
            "(or checkpoint.resume=false)"
        )
    changed = [f"{s}.{k}" for s, k in ORDER_KEYS if saved.get(s, {}).get(k) != now[s].get(k)]
    if changed:
        console.warn(
            f"resuming {path.name} with changed {', '.join(changed)}: the sample order after step "
            f"{meta['step']} differs from the original run's"
        )


def check_tensor_shapes(
    path: Path, model_sd: dict[str, Any], saved: dict[str, Any], config: JobConfig
) -> None:
    """Every model tensor of this job must exist in the checkpoint with the same (global) shape. Plugin options
    can change shapes too (e.g. ``deepseek_moe.segments``): the message names the options that changed.

    ``model_sd``: the tensors this job loads into; ``saved``: the job config the checkpoint was saved with."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from framework.checkpoint import SafeFileSystemReader

    stored = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    problems = []
    for name, tensor in model_sd.items():
        meta = stored.get(f"model.{name}")
        if not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{name}: not in the checkpoint")
        elif tuple(meta.size) != tuple(tensor.shape):
            problems.append(f"{name}: {tuple(meta.size)} there, {tuple(tensor.shape)} here")
    if not problems:
        return
    changed = _changed_plugin_options(saved, config.to_dict())
    hint = f"; changed since it was saved: {', '.join(changed[:6])}" if changed else ""
    raise CheckpointMismatch(
        f"checkpoint {path} does not fit this job's model ({'; '.join(problems[:3])}"
        f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}){hint}. Resume with the options the run "
        "was saved with, or start a new run (another run.dir, or checkpoint.resume=false)"
    )


def _changed_plugin_options(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``plugins: [...] -> [...]`` and ``section.key: old -> new`` for every plugin section key that changed."""
    changed = (
        [f"plugins: {saved.get('plugins')} -> {now.get('plugins')}"]
        if saved.get("plugins") != now.get("plugins")
        else []
    )
    for section in sorted((set(saved) | set(now)) - set(CORE_SECTIONS) - {"plugins"}):
        before, after = saved.get(section) or {}, now.get(section) or {}
        if isinstance(before, dict) and isinstance(after, dict):
            changed += [
                f"{section}.{k}: {before.get(k)!r} -> {after.get(k)!r}"
                for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k)
            ]
    return changed
