"""Supervised fine-tuning data: chat JSONL rows become packed (or padded) sequences with loss on assistant tokens only.

Rows (one JSON object per line; blank lines are ignored, other keys are ignored)::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}          # = a user message and an assistant message

Rendering: one code path for every tokenizer folder. The conversation is rendered with the folder's chat template
(``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``; ours is ChatML) through transformers'
``render_jinja_template``, the function ``apply_chat_template`` calls, with the folder's named special tokens
(``bos_token``, ``eos_token``, ...) as template variables; the text is encoded with the folder's ``tokenizer.json``
(special-token text parsed, nothing added).

Loss rule (template-agnostic, by incremental rendering as TRL and open-instruct do): for assistant message ``i``,

* ``before`` = the render of ``messages[:i]`` with the generation prompt (without it if that is not a prefix, for
  templates without a generation prompt), ``after`` = the render of ``messages[:i+1]``; both must be prefixes of the
  full render (else the row is bad: the template renders earlier turns differently once later ones follow);
* the turn's text is ``after[len(before):]``; its loss span starts where the message content (or, for templates
  that trim it, the stripped content) first occurs there and ends at the end of that text minus trailing whitespace.

For ChatML that is the content plus its closing ``<|im_end|>`` (the ``\\n`` after it and the next
``<|im_start|>assistant\\n`` header are not trained on); for a Llama-3-style template the content plus ``<|eot_id|>``.
Everything else (system, user, tool turns, template text) gets ``IGNORE_INDEX``. The text is encoded in segments cut at
span boundaries, so a token never straddles a boundary and the prompt part is tokenised exactly as it is at
inference (prompt encoded on its own); :class:`ChatTokenizer` refuses tokenizers that add text to every encode call.

Samples and sequences: a sample of ``L`` tokens contributes ``L - 1`` positions (``input_ids = t[:-1]``, ``labels =
t[1:]`` with non-assistant targets set to ``IGNORE_INDEX``), the shifted pairs the trainer's loss takes; a sample fits
a sequence of ``seq_len`` positions when ``L <= seq_len + 1`` (longer ones are truncated to their first
``seq_len + 1`` tokens, and dropped if no loss token is left, or dropped, per ``truncation``). Samples are shuffled by
``seed`` and, with packing, placed greedily in that order (next-fit: a sample joins the current sequence if it fits,
else starts the next one; a sample is never split). ``position_ids`` restart at 0 at every sample start and the padding
tail (``pad`` ids, ``IGNORE_INDEX`` labels) restarts at 0 too, so :func:`framework.models.masking.document_causal_mask`
keeps every document, padding included, to itself. Without packing each sample gets its own padded sequence.

Bad rows (not UTF-8, bad JSON, missing keys, wrong types, empty ``messages``, unknown role, no assistant message, a
template that rejects the row) are reported as ``file:line``: ``on_bad_row="error"`` raises :class:`DataError` at the
first one, ``"skip"`` counts them and prints one warning line on rank 0 naming the first few.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer as _HFTokenizer

from framework.config.errors import ConfigError
from framework.config.sections import SFTDataConfig
from framework.data.errors import DataError
from framework.data.labels import IGNORE_INDEX
from framework.data.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from framework.observe import console

KNOWN_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
"""Roles a message may have; anything else is a bad row (a typo such as ``asistant`` would silently lose its loss)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The named special tokens transformers passes to chat templates (``special_tokens_map``)."""
BAD_ROWS_SHOWN = 3

Messages = list[dict[str, Any]]


class _RowProblem(Exception):
    """What is wrong with one row (caught and turned into a :class:`BadRow`)."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: ``where`` is ``file:line`` (1-based)."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Sample:
    """One tokenised conversation: ``ids`` and, per token, whether it is a loss (assistant) token."""

    where: str
    ids: list[int]
    mask: list[bool]

    @property
    def positions(self) -> int:
        """Input positions it occupies in a sequence (``len(ids) - 1``)."""
        return len(self.ids) - 1


@dataclass
class SFTStats:
    """What building one split did, for logs and tests."""

    name: str
    seq_len: int
    rows: int = 0
    """Non-blank lines read."""
    bad_rows: list[BadRow] = field(default_factory=list)
    samples: int = 0
    """Samples placed in sequences."""
    truncated: int = 0
    """Samples cut to ``seq_len + 1`` tokens and kept."""
    dropped: int = 0
    """Samples longer than ``seq_len + 1`` tokens dropped (policy ``drop``, or ``truncate`` leaving no loss token)."""
    sequences: int = 0
    tokens: int = 0
    """Input positions holding sample tokens (the rest is padding)."""
    loss_tokens: int = 0

    @property
    def fill(self) -> float:
        """Share of sequence positions holding sample tokens."""
        return self.tokens / max(1, self.sequences * self.seq_len)

    def summary(self) -> str:
        """One line: rows, samples, sequences, fill, loss tokens, and what was dropped."""
        return (
            f"sft {self.name}: {self.rows} rows ({len(self.bad_rows)} bad) -> {self.samples} samples "
            f"({self.truncated} truncated, {self.dropped} dropped) -> {self.sequences} sequences of {self.seq_len} "
            f"(fill {100 * self.fill:.1f}%), {self.loss_tokens} loss tokens"
        )


# ----- tokenizer + chat template -----
def _token_text(value: Any) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTokenizer:
    """A ``tokenizers`` backend plus the chat template and named special tokens of its folder.

    Built from any HF tokenizer folder (:meth:`from_dir`: ``tokenizer.json`` + ``tokenizer_config.json`` and optional
    ``chat_template.jinja``) or from our :class:`~framework.data.tokenizer.Tokenizer` (:meth:`from_tokenizer`), which
    is the same data in memory; both render and encode through the same methods.
    """

    def __init__(self, backend: _HFTokenizer, config: Mapping[str, Any], *, source: str) -> None:
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render = render_jinja_template
        self.backend = backend
        self.source = source
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            raise DataError(
                f"tokenizer '{source}' has no chat template; add chat_template to {CONFIG_FILE} "
                f"(or a {CHAT_TEMPLATE_FILE} file) to train on chat data"
            )
        self.chat_template: str = template
        self.special_tokens: dict[str, str] = {
            key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None
        }
        pad = self.special_tokens.get("pad_token") or self.special_tokens.get("eos_token")
        pad_id = backend.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise DataError(
                f"tokenizer '{source}' has no pad_token or eos_token in its vocabulary; set pad_token in {CONFIG_FILE}"
            )
        self.pad_id: int = pad_id
        pieces = self.encode("a") + self.encode("b")
        if self.decode(pieces) != "ab":
            raise DataError(
                f"tokenizer '{source}' does not reproduce text encoded in pieces (encode('a') + encode('b') decodes "
                f"to {self.decode(pieces)!r}); SFT encodes template and assistant spans separately, so it needs a "
                "tokenizer that adds nothing per encode call (byte-level BPE does)"
            )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ChatTokenizer:
        """Load a HF tokenizer folder (ours or a foreign one) offline."""
        folder = Path(path)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(
                f"tokenizer folder '{folder}' has no {TOKENIZER_FILE}; point at a HF tokenizer folder"
            )
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"tokenizer file '{file}' cannot be read ({err}); re-create it") from None
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).is_file():
            try:
                config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            except ValueError:
                raise DataError(
                    f"tokenizer config '{folder / CONFIG_FILE}' is not valid JSON; re-create it"
                ) from None
        if (folder / CHAT_TEMPLATE_FILE).is_file():  # transformers saves the template here and prefers it
            config["chat_template"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(backend, config, source=str(folder))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTokenizer:
        """Wrap our tokenizer (ChatML template, ``<|pad|>`` padding) without writing it to a folder."""
        return cls(tokenizer.backend, tokenizer.hf_config(), source="expertrain tokenizer")

    def render(self, messages: Messages, *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages``, exactly as ``apply_chat_template(..., tokenize=False)``."""
        rendered, _ = self._render(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
        return rendered[0]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token text parsed and no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of many texts, in parallel."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def stop_ids(self) -> set[int]:
        """Token ids that end a generated answer: the first token the template puts after an assistant message's
        content (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``), the eos token and the pad token."""
        marker = "\x00answer\x00"
        text = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}])
        after = text.split(marker, 1)[1].lstrip() if marker in text else ""
        stops = {self.pad_id}
        if after:
            stops.add(self.encode(after)[0])
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := self.backend.token_to_id(eos)) is not None:
            stops.add(eos_id)
        return stops


def as_chat_tokenizer(tokenizer: ChatTokenizer | Tokenizer | str | os.PathLike[str]) -> ChatTokenizer:
    """A :class:`ChatTokenizer` from an instance, our :class:`Tokenizer`, or a folder path."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        return ChatTokenizer.from_tokenizer(tokenizer)
    return ChatTokenizer.from_dir(tokenizer)


# ----- rows -----
def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def conversation_from_record(record: Any) -> Messages:
    """The messages of one parsed JSONL record; raises ``_RowProblem`` naming what is wrong."""
    if not isinstance(record, dict):
        raise _RowProblem(f"expected a JSON object, got {_type_name(record)}")
    has_pair = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pair:
            raise _RowProblem("has both 'messages' and 'prompt'/'response'; keep one format per row")
        messages = record["messages"]
        if not isinstance(messages, list):
            raise _RowProblem(f"'messages' must be a list, got {_type_name(messages)}")
        if not messages:
            raise _RowProblem("'messages' is empty")
    elif has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise _RowProblem(f"missing key '{key}' (a prompt/response row needs both)")
            if not isinstance(record[key], str):
                raise _RowProblem(f"'{key}' must be a string, got {_type_name(record[key])}")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        raise _RowProblem("missing key 'messages' (or 'prompt' and 'response')")
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise _RowProblem(
                f"message {n} must be an object with 'role' and 'content', got {_type_name(message)}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise _RowProblem(f"message {n} has no '{key}'")
            if not isinstance(message[key], str):
                raise _RowProblem(f"message {n}: '{key}' must be a string, got {_type_name(message[key])}")
        if message["role"] not in KNOWN_ROLES:
            raise _RowProblem(
                f"message {n} has unknown role {message['role']!r} (expected one of {', '.join(KNOWN_ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowProblem("no assistant message (nothing to train on)")
    return [dict(m) for m in messages]


def read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[str, Messages] | BadRow]:
    """``(where, messages)`` for every usable row of a JSONL file and a :class:`BadRow` for every other non-blank
    line, in file order; ``where`` is ``file:line``."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"sft data file '{path}' does not exist; check sft.train_files / sft.val_file")
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{os.fspath(path)}:{line_no}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRow(where, "not UTF-8 text")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield BadRow(where, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            try:
                yield where, conversation_from_record(record)
            except _RowProblem as problem:
                yield BadRow(where, str(problem))


# ----- loss spans -----
def _render_row(chat: ChatTokenizer, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    try:
        return chat.render(messages, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 TemplateError from raise_exception, or any error inside the template
        raise _RowProblem(f"the chat template rejects it ({type(err).__name__}: {err})") from None


def _prefix_candidates(chat: ChatTokenizer, head: Messages) -> Iterator[str]:
    """Renders of the messages before an assistant turn, best first: with the generation prompt, without it, and
    (for a conversation that opens with the assistant, where templates may refuse no messages) the empty string."""
    for add_generation_prompt in (True, False):
        try:
            yield _render_row(chat, head, add_generation_prompt=add_generation_prompt)
        except _RowProblem:
            if head:
                raise
    if not head:
        yield ""


def assistant_spans(chat: ChatTokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character spans trained on (see the module docstring)."""
    text = _render_row(chat, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        after = _render_row(chat, messages[: i + 1])
        if not text.startswith(after):
            raise _RowProblem(
                f"the chat template renders message {i + 1} differently once later messages follow, so its "
                "assistant span cannot be found by prefix rendering"
            )
        before = next((c for c in _prefix_candidates(chat, messages[:i]) if after.startswith(c)), None)
        if before is None:
            raise _RowProblem(
                f"the chat template renders the messages before message {i + 1} differently once it follows, so its "
                "assistant span cannot be found by prefix rendering"
            )
        turn = after[len(before) :]
        content = message["content"]
        offset, length = turn.find(content), len(content)
        if offset < 0:
            offset, length = turn.find(content.strip()), len(content.strip())
        if offset < 0:
            raise _RowProblem(f"the chat template does not render the content of message {i + 1} verbatim")
        start = len(before) + offset
        end = max(len(before) + len(turn.rstrip()), start + length)
        if spans and start < spans[-1][1]:
            raise _RowProblem(f"assistant message {i + 1} overlaps the previous one in the rendered text")
        spans.append((start, end))
    return text, spans


def conversation_segments(chat: ChatTokenizer, messages: Messages) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_loss)`` segments (empty segments left out)."""
    text, spans = assistant_spans(chat, messages)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for start, end in spans:
        segments += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    segments.append((text[cursor:], False))
    return [(t, loss) for t, loss in segments if t]


def tokenize_segments(
    chat: ChatTokenizer, rows: Sequence[tuple[str, list[tuple[str, bool]]]]
) -> list[Sample]:
    """Encode every row's segments (one batched call) into :class:`Sample` s."""
    flat = [text for _, segments in rows for text, _ in segments]
    encoded = iter(chat.encode_batch(flat)) if flat else iter(())
    samples = []
    for where, segments in rows:
        ids: list[int] = []
        mask: list[bool] = []
        for _, loss in segments:
            seg_ids = next(encoded)
            ids += seg_ids
            mask += [loss] * len(seg_ids)
        samples.append(Sample(where, ids, mask))
    return samples


# ----- sequences -----
def fit_samples(
    samples: Sequence[Sample], seq_len: int, truncation: Literal["truncate", "drop"], stats: SFTStats
) -> list[Sample]:
    """Samples that fit ``seq_len`` positions: longer ones truncated or dropped (counted in ``stats``); samples with
    no loss target (nothing after the first token) are dropped too."""
    kept = []
    for sample in samples:
        if sample.positions > seq_len:
            if truncation == "drop":
                stats.dropped += 1
                continue
            sample = Sample(sample.where, sample.ids[: seq_len + 1], sample.mask[: seq_len + 1])
            if not any(sample.mask[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        elif not any(sample.mask[1:]):
            stats.dropped += 1
            continue
        kept.append(sample)
    return kept


def pack_samples(samples: Sequence[Sample], seq_len: int, packing: bool) -> list[list[Sample]]:
    """Group samples into sequences in the given order: greedy next-fit with packing, one per sequence without."""
    if not packing:
        return [[s] for s in samples]
    bins: list[list[Sample]] = []
    used = seq_len + 1  # forces a first bin
    for sample in samples:
        if used + sample.positions > seq_len:
            bins.append([])
            used = 0
        bins[-1].append(sample)
        used += sample.positions
    return bins


def assemble(bins: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """``(input_ids, labels, position_ids)`` int32 arrays ``[len(bins), seq_len]`` (see the module docstring)."""
    N = len(bins)
    input_ids_NS = np.full((N, seq_len), pad_id, dtype=np.int32)
    labels_NS = np.full((N, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids_NS = np.zeros((N, seq_len), dtype=np.int32)
    for n, group in enumerate(bins):
        t = 0
        for sample in group:
            L = sample.positions
            ids = np.asarray(sample.ids, dtype=np.int32)
            input_ids_NS[n, t : t + L] = ids[:-1]
            labels_NS[n, t : t + L] = np.where(np.asarray(sample.mask[1:]), ids[1:], IGNORE_INDEX)
            position_ids_NS[n, t : t + L] = np.arange(L)
            t += L
        position_ids_NS[n, t:] = np.arange(seq_len - t)  # the padding tail is a document of its own
    return input_ids_NS, labels_NS, position_ids_NS


class SFTDataset(torch.utils.data.Dataset):
    """Sequences of ``seq_len`` positions; item ``i`` is ``(input_ids [S], labels [S], position_ids [S])`` LongTensors.

    ``labels`` are already the next-token targets (``IGNORE_INDEX`` where no loss is taken), so a model's logits at
    position ``t`` are scored against ``labels[t]`` without shifting. Use with
    ``MicroBatchStream(..., collate=collate_sft)``.
    """

    def __init__(
        self,
        input_ids_NS: np.ndarray,
        labels_NS: np.ndarray,
        position_ids_NS: np.ndarray,
        stats: SFTStats,
        sources: Sequence[tuple[str, ...]] = (),
    ) -> None:
        self.input_ids_NS = input_ids_NS
        self.labels_NS = labels_NS
        self.position_ids_NS = position_ids_NS
        self.stats = stats
        self.sources = list(sources)  # per sequence, the file:line of each of its samples, in order

    @property
    def seq_len(self) -> int:
        return int(self.input_ids_NS.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids_NS.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = int(index)
        return (
            torch.from_numpy(self.input_ids_NS[i]).long(),
            torch.from_numpy(self.labels_NS[i]).long(),
            torch.from_numpy(self.position_ids_NS[i]).long(),
        )


def collate_sft(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack SFT items into a micro-batch ``(input_ids [m, S], labels [m, S], position_ids [m, S])``."""
    input_ids, labels, position_ids = zip(*items, strict=True)
    return torch.stack(input_ids), torch.stack(labels), torch.stack(position_ids)


# ----- building -----
def _read_files(
    files: Sequence[str | os.PathLike[str]], chat: ChatTokenizer, on_bad_row: str, stats: SFTStats
) -> list[tuple[str, list[tuple[str, bool]]]]:
    rows = []
    for path in files:
        for item in read_rows(path):
            stats.rows += 1
            if not isinstance(item, BadRow):
                where, messages = item
                try:
                    rows.append((where, conversation_segments(chat, messages)))
                    continue
                except _RowProblem as problem:
                    item = BadRow(where, str(problem))
            if on_bad_row == "error":
                raise DataError(f"{item}; fix the row or set sft.on_bad_row=skip")
            stats.bad_rows.append(item)
    return rows


def _to_dataset(
    rows: Sequence[tuple[str, list[tuple[str, bool]]]],
    chat: ChatTokenizer,
    cfg: SFTDataConfig,
    seq_len: int,
    stats: SFTStats,
    order_stream: int,
) -> SFTDataset:
    samples = fit_samples(tokenize_segments(chat, rows), seq_len, cfg.truncation, stats)
    order = np.random.default_rng([cfg.seed, order_stream]).permutation(len(samples))
    bins = pack_samples([samples[i] for i in order], seq_len, cfg.packing)
    arrays = assemble(bins, seq_len, chat.pad_id)
    stats.samples, stats.sequences = len(samples), len(bins)
    stats.tokens = sum(s.positions for s in samples)
    stats.loss_tokens = int((arrays[1] != IGNORE_INDEX).sum())
    return SFTDataset(*arrays, stats=stats, sources=[tuple(s.where for s in group) for group in bins])


def _warn_dropped(stats: SFTStats, truncation: str) -> None:
    if stats.dropped:
        why = "longer than" if truncation == "drop" else "with no response token left within"
        console.warn(
            f"sft {stats.name}: dropped {stats.dropped} samples {why} seq_len={stats.seq_len} + 1 tokens"
        )


def build_sft_datasets(
    cfg: SFTDataConfig,
    tokenizer: ChatTokenizer | Tokenizer | str | os.PathLike[str],
    seq_len: int,
) -> tuple[SFTDataset, SFTDataset | None]:
    """``(train, validation)`` SFT datasets from ``cfg`` (validation is None without val_file or val_fraction).

    Deterministic for the same files, tokenizer, ``seq_len`` and ``cfg``; cheap enough that every rank builds its own
    copy (no collectives). Raises :class:`DataError` / :class:`ConfigError` with one line on every rank alike.
    """
    if seq_len < 1:
        raise ConfigError("data.seq_len", seq_len, "expected an integer >= 1")
    if not cfg.train_files:
        raise ConfigError("sft.train_files", cfg.train_files, "expected at least one JSONL file")
    cfg.validate("sft")
    chat = as_chat_tokenizer(tokenizer)
    train_stats = SFTStats("train", seq_len)
    train_rows = _read_files(cfg.train_files, chat, cfg.on_bad_row, train_stats)
    val_stats: SFTStats | None = None
    val_rows: list[tuple[str, list[tuple[str, bool]]]] = []
    if cfg.val_file:
        val_stats = SFTStats("validation", seq_len)
        val_rows = _read_files([cfg.val_file], chat, cfg.on_bad_row, val_stats)
    elif cfg.val_fraction > 0:
        n = len(train_rows)
        n_val = int(round(cfg.val_fraction * n))
        if n_val < 1 or n_val >= n:
            raise ConfigError(
                "sft.val_fraction",
                cfg.val_fraction,
                f"{n} usable rows leave {n_val} for validation and {n - n_val} for training; add rows, change "
                "sft.val_fraction or give sft.val_file",
            )
        held_out = set(np.random.default_rng([cfg.seed, 0]).permutation(n)[:n_val].tolist())
        val_rows = [r for i, r in enumerate(train_rows) if i in held_out]
        train_rows = [r for i, r in enumerate(train_rows) if i not in held_out]
        val_stats = SFTStats("validation", seq_len, rows=n_val)
        train_stats.rows -= n_val

    bad = train_stats.bad_rows + (val_stats.bad_rows if val_stats else [])
    if bad:
        rows = train_stats.rows + (val_stats.rows if val_stats else 0)
        shown = "; ".join(str(b) for b in bad[:BAD_ROWS_SHOWN]) + (
            "; ..." if len(bad) > BAD_ROWS_SHOWN else ""
        )
        console.warn(f"sft: skipped {len(bad)} bad rows of {rows} (sft.on_bad_row=skip): {shown}")

    train = _to_dataset(train_rows, chat, cfg, seq_len, train_stats, order_stream=1)
    _warn_dropped(train_stats, cfg.truncation)
    if len(train) == 0:
        raise DataError(
            f"sft: no usable training samples in {', '.join(map(str, cfg.train_files))} ({train_stats.summary()}); "
            "fix the rows or raise data.seq_len"
        )
    val = None
    if val_stats is not None:
        val = _to_dataset(val_rows, chat, cfg, seq_len, val_stats, order_stream=2)
        _warn_dropped(val_stats, cfg.truncation)
        if len(val) == 0:
            raise DataError(f"sft: no usable validation samples ({val_stats.summary()}); fix the rows")
    return train, val
