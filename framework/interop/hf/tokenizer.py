"""Tokenizers of Hugging Face folders, offline: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``).

:func:`load_hf_tokenizer` returns our :class:`~framework.data.tokenizer.Tokenizer` when the folder holds one of ours
(its fixed special tokens at ids 0-3), and otherwise a :class:`ForeignTokenizer`: the same interface (encode /
decode, ``eod`` / ``pad`` / ``vocab_size``, ``unique_identifiers`` for megatron-core, ``apply_chat_template``,
``save``) over any fast tokenizer, with its special tokens and chat template taken from ``tokenizer_config.json``.
As with our tokenizer, ``encode`` adds no BOS/EOS (documents get ``eod`` appended by the data pipeline).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from framework.data.errors import DataError
from framework.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers 5 writes the chat template (older versions keep it in tokenizer_config.json)."""


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ForeignTokenizer:
    """A Hugging Face fast tokenizer with the interface of :class:`~framework.data.tokenizer.Tokenizer`."""

    def __init__(
        self, backend: _HFTokenizer, config: dict[str, Any], chat_template: str | None = None
    ) -> None:
        self._backend = backend
        self._plain = _HFTokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.config = dict(config)
        self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
        self.model_max_length = int(config.get("model_max_length", 4096) or 4096)
        eos = _token(config.get("eos_token"))
        if eos is None or backend.token_to_id(eos) is None:
            raise DataError(
                f"tokenizer_config.json names eos_token {eos!r}, which is not in tokenizer.json; expertrain ends "
                "every document with it, so the tokenizer needs one"
            )
        self._eos = backend.token_to_id(eos)
        pad = _token(config.get("pad_token"))
        self._pad = backend.token_to_id(pad) if pad is not None else None
        if self._pad is None:
            self._pad = self._eos
        self._fingerprint = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ForeignTokenizer:
        folder = Path(path)
        backend = _read_backend(folder)
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).is_file():
            try:
                config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            except ValueError:
                raise DataError(f"tokenizer config '{folder / CONFIG_FILE}' is not valid JSON") from None
        template = None
        if (folder / TEMPLATE_FILE).is_file():
            template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(backend, config, template)

    # ----- the Tokenizer interface -----
    @property
    def eod(self) -> int:
        """Id of the ``eos_token`` (appended after every document)."""
        return self._eos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def pad(self) -> int:
        """Id of ``pad_token``, or of ``eos_token`` when the tokenizer has none."""
        return self._pad

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        return OrderedDict(
            [
                ("class", "expertrain.ForeignTokenizer"),
                ("fingerprint", self._fingerprint),
                ("vocab_size", self.vocab_size),
            ]
        )

    @property
    def backend(self) -> _HFTokenizer:
        return self._backend

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        return (self._backend if parse_special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, parse_special: bool = False) -> list[list[int]]:
        backend = self._backend if parse_special else self._plain
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> str:
        """Render ``messages`` with the folder's chat template, with the variables transformers passes
        (special tokens by name, ``raise_exception``)."""
        if not self.chat_template:
            raise DataError(
                "this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)"
            )
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        specials = {
            name: _token(self.config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / TOKENIZER_FILE))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder


def _read_backend(folder: Path) -> _HFTokenizer:
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(
            f"tokenizer folder '{folder}' has no {TOKENIZER_FILE} (slow sentencepiece-only tokenizers are not read; "
            "save the tokenizer with transformers' fast tokenizer first)"
        )
    try:
        return _HFTokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer file '{file}' cannot be read ({err})") from None


def load_hf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer | ForeignTokenizer:
    """Our :class:`Tokenizer` if the folder holds one of ours, else a :class:`ForeignTokenizer`."""
    try:
        return Tokenizer.from_dir(path)
    except DataError:
        return ForeignTokenizer.from_dir(path)
