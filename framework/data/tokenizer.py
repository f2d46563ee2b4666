"""Byte-level BPE tokenizer (HF ``tokenizers``) with fixed special tokens and a ChatML chat template.

Special tokens and their fixed ids (the first ids of every tokenizer this module trains):

====  =================  ===========================================================
id    token              role
====  =================  ===========================================================
0     ``<|endoftext|>``  end of document (``eod``); also ``eos`` and ``bos`` for HF
1     ``<|pad|>``        padding (never produced by encoding text)
2     ``<|im_start|>``   ChatML: opens a message, followed by the role name and ``\\n``
3     ``<|im_end|>``     ChatML: closes a message
====  =================  ===========================================================

Chat design: ChatML. Roles (``system``, ``user``, ``assistant``, anything else) are plain text after
``<|im_start|>``, so there is no closed list of role tokens. A conversation renders as
``<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n``.

A saved tokenizer is a folder with ``tokenizer.json`` and ``tokenizer_config.json`` that
``transformers.AutoTokenizer.from_pretrained(folder)`` loads offline and that encodes exactly like :class:`Tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from framework.data.errors import DataError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOD_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
"""Special tokens in id order: ``SPECIAL_TOKENS[i]`` has id ``i`` in every trained tokenizer."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML as a Jinja template (the same string is stored in ``tokenizer_config.json``)."""

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class TokenizerSettings:
    """How a tokenizer is trained; part of the embedded corpus cache key."""

    vocab_size: int = 8192
    """Total vocabulary size including the special tokens (a small corpus may yield fewer)."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    model_max_length: int = 4096
    """Written to ``tokenizer_config.json``; HF warns when a single encode exceeds it."""

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form, for cache keys and manifests (includes the special tokens)."""
        return {**asdict(self), "special_tokens": list(SPECIAL_TOKENS), "chat_template": CHAT_TEMPLATE}


def train_tokenizer(texts: Iterable[str], settings: TokenizerSettings | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts and settings)."""
    settings = settings or TokenizerSettings()
    if settings.vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {settings.vocab_size} is below the 256 byte symbols + special tokens")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, model_max_length=settings.model_max_length)


class Tokenizer:
    """A trained tokenizer: encode/decode, the special ids, and the attributes megatron-core's datasets read.

    megatron-core reads ``eod``, ``pad``, ``vocab_size`` and ``unique_identifiers`` (the latter goes into the hash
    that names its index cache files).
    """

    def __init__(self, backend: _HFTokenizer, model_max_length: int = 4096) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(token) != expected_id:
                raise DataError(
                    f"tokenizer: special token {token!r} has id {backend.token_to_id(token)}, expected {expected_id}; "
                    "train it with framework.data.train_tokenizer"
                )
        self._attach(backend, model_max_length)

    def _attach(self, backend: _HFTokenizer, model_max_length: int) -> None:
        """Hold ``backend`` (subclasses with other special tokens call this instead of ``__init__``)."""
        self._backend = backend
        # A second instance that treats special-token text as plain text (for raw documents).
        self._plain = _HFTokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.model_max_length = model_max_length
        self._fingerprint = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()

    # ----- special ids -----
    @property
    def eod(self) -> int:
        """Id of ``<|endoftext|>``, appended after every document."""
        return SPECIAL_TOKENS.index(EOD_TOKEN)

    @property
    def eos(self) -> int:
        """Same as :attr:`eod` (HF's ``eos_token``)."""
        return self.eod

    @property
    def pad(self) -> int:
        """Id of ``<|pad|>``."""
        return SPECIAL_TOKENS.index(PAD_TOKEN)

    @property
    def im_start(self) -> int:
        """Id of ``<|im_start|>``."""
        return SPECIAL_TOKENS.index(IM_START_TOKEN)

    @property
    def im_end(self) -> int:
        """Id of ``<|im_end|>``."""
        return SPECIAL_TOKENS.index(IM_END_TOKEN)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows must equal this)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the serialised tokenizer: equal fingerprints encode identically."""
        return self._fingerprint

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What megatron-core hashes into its index cache names."""
        return OrderedDict(
            [
                ("class", f"expertrain.{type(self).__name__}"),
                ("fingerprint", self._fingerprint),
                ("vocab_size", self.vocab_size),
            ]
        )

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    # ----- encode / decode -----
    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. With ``parse_special`` (the HF default) ``<|im_end|>`` etc. in text map to their ids;
        without it they are encoded as ordinary characters (use that for raw documents)."""
        return (self._backend if parse_special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, parse_special: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel. Defaults to treating special-token text as plain text."""
        backend = self._backend if parse_special else self._plain
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (exact inverse of :meth:`encode` for any UTF-8 text)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) with the ChatML template, as HF would."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(CHAT_TEMPLATE).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt
        )

    # ----- files -----
    def hf_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` content transformers reads."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOD_TOKEN,
            "eos_token": EOD_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into the folder ``path`` (created if missing)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / TOKENIZER_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.hf_config(), indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a folder written by :meth:`save` (or any folder with a compatible ``tokenizer.json``)."""
        folder = Path(path)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(
                f"tokenizer folder '{folder}' has no {TOKENIZER_FILE}; point data.tokenizer at a folder written by "
                "`expertrain data prepare` (PREFIX.tokenizer) or leave it empty for the embedded tokenizer"
            )
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer file '{file}' cannot be read ({err}); re-create it") from None
        max_len = 4096
        config_file = folder / CONFIG_FILE
        if config_file.is_file():
            try:
                max_len = int(
                    json.loads(config_file.read_text(encoding="utf-8")).get("model_max_length", max_len)
                )
            except (ValueError, TypeError):
                raise DataError(f"tokenizer config '{config_file}' is not valid JSON; re-create it") from None
        return cls(backend, model_max_length=max_len)
