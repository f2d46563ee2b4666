"""``load_hf_weights`` on a whole model: what it reads, and ``keys`` (only the named tensors are filled; adapters a
plugin added are neither looked for nor touched).

The folder is a tiny random qwen3_moe saved by transformers (per-expert keys on disk). Weights are compared with
``torch.equal`` (a copy, no round-off); byte counts against the folder's own tensors (``load_file``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from framework.checkpoint.warm_start import load_model_weights  # noqa: E402
from framework.interop.hf import HFCheckpointError, from_pretrained, load_pretrained  # noqa: E402
from framework.interop.hf.folders import load_hf_weights  # noqa: E402
from framework.models import Transformer  # noqa: E402
from tests.unit.checkpoint.test_warm_start_from_run import assert_base_loaded, job_file, lora_model  # noqa: E402
from tests.unit.interop.test_hf_families import _saved  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(tmp_path_factory.mktemp("partial"), "qwen3_moe")[1]


def _fresh(folder: Path) -> Transformer:
    """The folder's model, initialised (not loaded)."""
    config = load_pretrained(folder).config
    model = Transformer(config.model, config.moe)
    model.init_weights(3)
    return model


def test_a_whole_model_reads_every_tensor_of_the_folder_once(folder: Path) -> None:
    stats = load_hf_weights(_fresh(folder), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    folder_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats.folder_bytes == folder_bytes
    assert stats.bytes_read == folder_bytes


def test_keys_fill_only_the_named_tensors(folder: Path) -> None:
    model = _fresh(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "layers.1.ffn.experts.gate_up_proj"
    stats = load_hf_weights(model, folder, keys={name})
    want = from_pretrained(folder).state_dict()
    state = model.state_dict()
    assert torch.equal(state[name], want[name])
    assert all(torch.equal(state[k], before[k]) for k in state if k != name), "a tensor not asked for changed"
    assert stats.bytes_read == want[name].numel() * 4  # fp32 folder: that tensor's experts only
    with pytest.raises(
        HFCheckpointError, match=r"asked to load 'layers\.9\.nothing', which the model does not"
    ):
        load_hf_weights(model, folder, keys={"layers.9.nothing"})


def test_base_tensors_load_into_a_lora_model_and_the_adapters_are_left_alone(
    folder: Path, tmp_path: Path
) -> None:
    job = job_file(tmp_path, f"hf:{folder}", plugins=["lora"], lora={"targets": "all-linear", "r": 4})
    model, base_keys, adapters = lora_model(job)
    with pytest.raises(HFCheckpointError, match=r"checkpoint tensor '.*lora\.lora_A' is missing"):
        load_model_weights(f"hf:{folder}", model)
    load_model_weights(f"hf:{folder}", model, keys=base_keys)
    want = from_pretrained(folder).state_dict()
    assert_base_loaded(model, {k: want[k] for k in base_keys}, adapters)
