"""A foreign HF tokenizer folder (special tokens not at ours' fixed ids, its own chat template) loads offline with
the same ids and rendering as transformers' AutoTokenizer, and save_pretrained writes it beside the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as Backend  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from framework.data.tokenizer import Tokenizer  # noqa: E402
from framework.interop.hf import save_pretrained  # noqa: E402
from framework.interop.hf.tokenizer import ForeignTokenizer, load_hf_tokenizer  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts, routed top-2!", "ünïcödé 123"]


def _foreign_folder(tmp_path: Path) -> Path:
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 20, trainer=trainer)
    folder = tmp_path / "tok"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_foreign_tokenizer_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = _foreign_folder(tmp_path)
    ours = load_hf_tokenizer(folder)
    assert isinstance(ours, ForeignTokenizer)
    theirs = AutoTokenizer.from_pretrained(folder)
    assert (ours.eod, ours.pad, ours.vocab_size) == (2, 2, len(theirs))  # no pad token: eos pads
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for prompt in (False, True):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_save_pretrained_writes_the_tokenizer_beside_the_weights(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from framework.config.sections import ModelConfig, MoEConfig
    from framework.models import Transformer

    tok = load_hf_tokenizer(_foreign_folder(tmp_path))
    model = Transformer(
        ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1),
        MoEConfig(num_experts=0),
    )
    model.init_weights(0)
    written = save_pretrained(model, tmp_path / "out", tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(written)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.encode(TEXTS[0], add_special_tokens=False) == tok.encode(TEXTS[0])
    assert load_hf_tokenizer(tmp_path / "out").apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<s>[user] x</s>"
    )


def test_our_own_tokenizer_folder_loads_as_ours(tmp_path: Path) -> None:
    from framework.data.tokenizer import TokenizerSettings, train_tokenizer

    tok = train_tokenizer(TEXTS * 20, TokenizerSettings(vocab_size=300, min_frequency=1))
    tok.save(tmp_path / "ours")
    assert isinstance(load_hf_tokenizer(tmp_path / "ours"), Tokenizer)
