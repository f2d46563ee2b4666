"""Render ``docs/config.md`` from the section classes, so the reference cannot drift from the code."""

from __future__ import annotations

from framework.config.schema import section_docs
from framework.config.sections import CORE_SECTIONS

HEADER = """# Config reference

Generated from `framework/config/sections.py` by `expertrain config-docs --output docs/config.md`;
a test fails when this file and the code disagree.

A job file is YAML with one mapping per section, plus `plugins` (a list of plugin names to load).
Any key can be overridden on the command line: `--set section.key=value` (YAML values: `--set data.paths=[a, b]`).
Plugins add their own top-level section, named after the plugin (`lora`, `hft`, `deepseek_moe`, ...); it is
accepted once the plugin is listed in `plugins`, and `expertrain plugins` shows what is installed.

Rules across sections: `data.seq_len <= model.max_seq_len`; `train.global_batch_size` must be a multiple of
(data-parallel ranks x `train.micro_batch_size`); the tokenizer's vocabulary must fit `model.vocab_size`.
"""


def _fmt_default(v: object) -> str:
    if v == "" or v == []:
        return "`" + repr(v) + "`"
    return f"`{v}`"


def render_config_reference() -> str:
    out = [HEADER]
    for name, cls in CORE_SECTIONS.items():
        out.append(f"\n## `{name}`\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for field, typ, default, doc in section_docs(cls):
            out.append(f"| `{name}.{field}` | {typ} | {_fmt_default(default)} | {doc} |")
    out.append("")
    return "\n".join(out)
