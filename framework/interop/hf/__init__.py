"""Hugging Face checkpoint folders in and out: ``config.json`` + safetensors (single file or sharded with
``model.safetensors.index.json``), never pickles.

- :func:`from_pretrained` builds our :class:`~framework.models.Transformer` from a folder (fp32 by default);
  :func:`load_pretrained` also returns the job sections and the plugin manager. Every family is built from core
  components (qwen2_moe / deepseek_v3's shared experts are the core ``moe.shared_experts``): no plugin needed.
- :func:`read_hf_config` / :func:`hf_config_to_job_sections`: the folder's config as our sections, to build a job.
- :func:`load_hf_weights`: the folder's weights into a model built from those sections (plain, unsharded tensors).
- :func:`save_pretrained` writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with
  no missing or unexpected keys (experts in the per-expert hub layout transformers itself writes), plus an optional
  tokenizer.

Families and the fields each refuses: :mod:`framework.interop.hf.config_map`; tensor layouts:
:mod:`framework.interop.hf.state_map`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from framework.interop.hf.config_map import HFConfigError, HFModelSpec
    from framework.interop.hf.folders import (
        HFLoad,
        from_pretrained,
        hf_config_to_job_sections,
        load_hf_weights,
        load_pretrained,
        read_hf_config,
        save_pretrained,
        spec_from_model,
    )
    from framework.interop.hf.state_map import HFCheckpointError

__all__ = [
    "HFCheckpointError",
    "HFConfigError",
    "HFLoad",
    "HFModelSpec",
    "from_pretrained",
    "hf_config_to_job_sections",
    "load_hf_weights",
    "load_pretrained",
    "read_hf_config",
    "save_pretrained",
    "spec_from_model",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the package also holds job.py, which the launcher imports before torch to type a job.
    if name in __all__:
        from framework.interop.hf import folders

        return getattr(folders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
