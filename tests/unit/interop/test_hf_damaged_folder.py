"""A damaged Hugging Face folder is one error line naming the file, never a traceback from safetensors or json.

Each case damages a copy of a folder that :func:`save_pretrained` wrote and loads it as ``model.init_from: hf:``
does (:func:`from_pretrained`); the error must be one of the launcher's user errors (printed as one line) and name
the damaged file. The launcher's path through two ranks is tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from framework.config.sections import ModelConfig, MoEConfig
from framework.interop.hf import save_pretrained
from framework.interop.hf.folders import from_pretrained
from framework.models import Transformer
from framework.train.launch import user_error_types


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = Transformer(
        ModelConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16
        ),
        MoEConfig(num_experts=4, top_k=2, expert_hidden=24),
    )
    model.init_weights(0)
    folder = tmp_path_factory.mktemp("hf") / "folder"
    save_pretrained(model, folder)
    return folder


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def _not_json(path: Path) -> None:
    path.write_text('{"model_type": "mixtral", hidden_size: 32', encoding="utf-8")


# (damage, file it hits, words the line must hold)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated safetensors": (_cut_in_half, "model.safetensors", "not a readable safetensors file"),
    "random bytes as safetensors": (_random_bytes, "model.safetensors", "not a readable safetensors file"),
    "empty safetensors": (
        lambda p: p.write_bytes(b""),
        "model.safetensors",
        "not a readable safetensors file",
    ),
    "config.json not JSON": (_not_json, "config.json", "not valid JSON"),
    "config.json a list": (lambda p: p.write_text("[1, 2]"), "config.json", "not a JSON object"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_folder_is_one_line_naming_the_file(saved: Path, tmp_path: Path, kind: str) -> None:
    damage, name, words = DAMAGE[kind]
    folder = Path(shutil.copytree(saved, tmp_path / "folder"))
    damage(folder / name)
    with pytest.raises(user_error_types()) as caught:
        from_pretrained(folder)
    message = str(caught.value)
    assert os.fspath(folder / name) in message and words in message and "\n" not in message, message


def test_a_config_field_of_the_wrong_type_is_one_line_naming_it(saved: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(saved, tmp_path / "folder"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}), encoding="utf-8")
    with pytest.raises(user_error_types(), match="'hidden_size': got 'big'; expected a positive integer"):
        from_pretrained(folder)
