from __future__ import annotations

from pathlib import Path

import pytest
from data_testutils import SMALL_SETTINGS, make_documents

from framework.data.errors import DataError
from framework.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces\tand\ttabs\n\n\n",
    "unicode: héllo wörld — ✓ 😀 日本語",
    "",
]


def test_round_trip(small_tokenizer: Tokenizer) -> None:
    for text in SAMPLES:
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text
        assert small_tokenizer.decode(small_tokenizer.encode(text, parse_special=False)) == text
    assert small_tokenizer.encode_batch(SAMPLES) == [small_tokenizer.encode(t) for t in SAMPLES]


def test_special_tokens_have_fixed_ids(small_tokenizer: Tokenizer) -> None:
    assert list(SPECIAL_TOKENS) == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert [small_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (small_tokenizer.eod, small_tokenizer.pad, small_tokenizer.im_start, small_tokenizer.im_end) == (
        0,
        1,
        2,
        3,
    )
    assert 256 + len(SPECIAL_TOKENS) <= small_tokenizer.vocab_size <= 512  # a tiny corpus yields fewer merges
    # Special-token text is parsed only when asked: raw documents cannot forge an end-of-document.
    assert small_tokenizer.encode("<|im_end|>") == [3]
    plain = small_tokenizer.encode("<|endoftext|>", parse_special=False)
    assert 0 not in plain and small_tokenizer.decode(plain) == "<|endoftext|>"


def test_training_is_deterministic(small_tokenizer: Tokenizer) -> None:
    again = train_tokenizer(make_documents(40, seed=123), SMALL_SETTINGS)
    assert again.fingerprint == small_tokenizer.fingerprint
    other = train_tokenizer(make_documents(40, seed=7), SMALL_SETTINGS)
    assert other.fingerprint != small_tokenizer.fingerprint


def test_save_and_load(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    small_tokenizer.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.fingerprint == small_tokenizer.fingerprint
    assert loaded.unique_identifiers["fingerprint"] == small_tokenizer.fingerprint
    assert loaded.model_max_length == SMALL_SETTINGS.model_max_length
    with pytest.raises(DataError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_transformers_autotokenizer_loads_offline(
    monkeypatch: pytest.MonkeyPatch, small_tokenizer_dir: Path, small_tokenizer: Tokenizer
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(small_tokenizer_dir))
    for text in [*SAMPLES, "<|im_start|>user\nhi<|im_end|>\n"]:
        assert hf(text)["input_ids"] == small_tokenizer.encode(text)
        assert hf.decode(small_tokenizer.encode(text)) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 1, 0)
    assert hf.chat_template == CHAT_TEMPLATE

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    assert hf.apply_chat_template(messages, tokenize=False) == expected
    assert small_tokenizer.apply_chat_template(messages) == expected
    prompt = small_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == prompt
