"""The export writers as they were before streaming, kept as the reference the streamed ones must match byte for
byte: the whole state dict converted at once (``native_to_hf``), each file written with ``safetensors.torch.save_file``
(which holds all of a file's tensors and then a copy of their bytes). Used by the tests and by
``benchmarks/memory.py`` (the "in-memory" column)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from framework.interop.hf import spec_from_model
from framework.interop.hf.config_map import hf_config_from_spec
from framework.interop.hf.folders import _layout
from framework.interop.hf.state_map import native_to_hf, rules_for
from framework.models import Transformer


def reference_hf_folder(model: Transformer, out: Path, max_shard_bytes: int) -> None:
    """The writer before streaming: the whole state dict converted at once, shards written with save_file."""
    spec = spec_from_model(model)
    config = hf_config_from_spec(spec, dtype="float32")
    rules = rules_for(model.state_dict(), _layout(model, spec), model.model_cfg.tie_embeddings)
    tensors = native_to_hf(model.state_dict(), rules)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    out.mkdir(parents=True)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(v.nbytes for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def reference_native_file(model: torch.nn.Module, file: Path) -> None:
    """``export native``'s ``model.safetensors`` before streaming: ``save_file`` of a copy of the state dict."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(file), metadata={"format": "expertrain-native"})
