"""Tokenizers of Hugging Face folders, offline: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``).

:func:`load_hf_tokenizer` returns our :class:`~framework.data.tokenizer.Tokenizer` when the folder holds one of ours
(its fixed special tokens at ids 0-3), and otherwise a :class:`ForeignTokenizer`: the same interface (encode /
decode, ``eod`` / ``pad`` / ``vocab_size``, ``unique_identifiers`` for megatron-core, ``apply_chat_template``,
``save``) over any fast tokenizer, with its special tokens and chat template taken from ``tokenizer_config.json``.
As with our tokenizer, ``encode`` adds no BOS/EOS (documents get ``eod`` appended by the data pipeline).
"""

from __future__ import annotations

import json
import os
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


class ForeignTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer with the interface of :class:`~framework.data.tokenizer.Tokenizer`: its own
    special tokens (``eod`` = ``eos_token``; ``pad`` = ``pad_token`` or ``eos_token``) and chat template."""

    def __init__(
        self, backend: _HFTokenizer, config: dict[str, Any], chat_template: str | None = None
    ) -> None:
        self._attach(backend, int(config.get("model_max_length", 4096) or 4096))
        self.config = dict(config)
        self.chat_template = chat_template if chat_template is not None else config.get("chat_template")
        eos = _token(config.get("eos_token"))
        if eos is None or backend.token_to_id(eos) is None:
            raise DataError(
                f"tokenizer_config.json names eos_token {eos!r}, which is not in tokenizer.json; expertrain ends "
                "every document with it, so the tokenizer needs one"
            )
        self._eos: int = backend.token_to_id(eos)
        pad = _token(config.get("pad_token"))
        pad_id = backend.token_to_id(pad) if pad is not None else None
        self._pad: int = self._eos if pad_id is None else pad_id

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

    # ----- what differs from our tokenizer -----
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
    def im_start(self) -> int:
        raise DataError(
            "a foreign tokenizer has no fixed ChatML tokens; render chats with apply_chat_template"
        )

    @property
    def im_end(self) -> int:
        raise DataError(
            "a foreign tokenizer has no fixed ChatML tokens; render chats with apply_chat_template"
        )

    def hf_config(self) -> dict[str, Any]:
        """The folder's ``tokenizer_config.json`` content, with the chat template."""
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> str:
        """Render ``messages`` with the folder's chat template, exactly as transformers' ``apply_chat_template``
        (one rendering path for every tokenizer: :class:`~framework.data.sft.ChatTokenizer`)."""
        from framework.data.sft import ChatTokenizer

        chat = ChatTokenizer(self.backend, self.hf_config(), source="foreign tokenizer")
        return chat.render(list(messages), add_generation_prompt=add_generation_prompt)


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
