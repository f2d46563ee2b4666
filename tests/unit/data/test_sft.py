from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from framework.config.errors import ConfigError
from framework.config.schema import build_section, section_docs
from framework.config.sections import SFTDataConfig
from framework.data.errors import DataError
from framework.data.labels import IGNORE_INDEX
from framework.data.loader import MicroBatchStream
from framework.data.sft import (
    BadRow,
    ChatTokenizer,
    SFTDataset,
    build_sft_datasets,
    collate_sft,
    conversation_segments,
    read_rows,
)
from framework.data.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "A model. héllo ✓"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "  indented\nlines  "},
]


def write_jsonl(path: Path, rows: list[Any]) -> str:
    """Rows are JSON-encoded unless they are already strings (raw lines, for malformed input)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def make_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic conversations of varied length (rows alternate between the two formats)."""
    rows = []
    for i in range(count):
        reply = " ".join(f"w{(i * 7 + j) % 13}" for j in range(1 + (i * 5 + seed) % 9))
        if i % 2:
            rows.append({"prompt": f"question {i}", "response": reply})
        else:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"row {i}"},
                        {"role": "assistant", "content": reply},
                    ]
                }
            )
    return rows


def loss_runs(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of consecutive non-ignored label ids."""
    runs: list[list[int]] = []
    previous = False
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != IGNORE_INDEX
    return runs


def documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each stretch whose positions count up from 0."""
    starts = [t for t, p in enumerate(position_ids.tolist()) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def build(
    files: list[str], tokenizer: Any, seq_len: int, **options: Any
) -> tuple[SFTDataset, SFTDataset | None]:
    return build_sft_datasets(SFTDataConfig(train_files=files, **options), tokenizer, seq_len)


@pytest.fixture(scope="module")
def chat(small_tokenizer: Tokenizer) -> ChatTokenizer:
    return ChatTokenizer.from_tokenizer(small_tokenizer)


# ----- loss mask -----
def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path: Path, chat: ChatTokenizer) -> None:
    rows = [
        {"messages": CONVERSATION},
        {"prompt": "2+2?", "response": "4"},
        # Opens with the assistant and its content "a" also occurs in the header "assistant": the span must still
        # be the content, found through the generation prompt rather than by searching.
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "ok"}]},
    ]
    file = write_jsonl(tmp_path / "t.jsonl", rows)
    train, _ = build([file], chat, 128, packing=False)
    assert len(train) == 3
    expected = {
        f"{file}:1": [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"],
        f"{file}:2": ["4<|im_end|>"],
        f"{file}:3": ["a<|im_end|>"],
    }
    for i in range(len(train)):
        input_ids, labels, position_ids = train[i]
        (where,) = train.sources[i]
        assert [chat.decode(run) for run in loss_runs(labels)] == expected[where]
        # Labels are next-token targets: wherever a loss is taken, the label is the following input token.
        _, n = documents(position_ids)[0]
        taken = labels[: n - 1] != IGNORE_INDEX
        assert torch.equal(labels[: n - 1][taken], input_ids[1:n][taken])


def test_segments_cut_chatml_at_content_and_im_end(chat: ChatTokenizer) -> None:
    segments = conversation_segments(chat, CONVERSATION[1:3])
    assert segments == [
        ("<|im_start|>user\nHi, who are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A model. héllo ✓<|im_end|>", True),
        ("\n", False),
    ]


def test_folder_and_in_memory_tokenizer_give_identical_data(
    tmp_path: Path, small_tokenizer: Tokenizer, small_tokenizer_dir: Path
) -> None:
    file = write_jsonl(tmp_path / "t.jsonl", make_rows(12))
    a, _ = build([file], small_tokenizer, 64)
    b, _ = build([file], small_tokenizer_dir, 64)
    assert torch.equal(torch.from_numpy(a.input_ids_NS), torch.from_numpy(b.input_ids_NS))
    assert torch.equal(torch.from_numpy(a.labels_NS), torch.from_numpy(b.labels_NS))


# ----- packing, padding, truncation -----
def test_packing_restarts_positions_and_keeps_samples_whole(tmp_path: Path, chat: ChatTokenizer) -> None:
    rows = make_rows(40)
    file = write_jsonl(tmp_path / "t.jsonl", rows)
    seq_len = 64
    train, _ = build([file], chat, seq_len, packing=True, seed=3)
    padded, _ = build([file], chat, seq_len, packing=False)
    assert len(train) < len(padded) == 40  # packing holds several samples per sequence
    assert train.stats.samples == 40 and train.stats.truncated == train.stats.dropped == 0
    seen = []
    for i in range(len(train)):
        input_ids, labels, position_ids = train[i]
        docs = documents(position_ids)
        assert len(docs) >= len(train.sources[i])
        for (start, end), where in zip(docs, train.sources[i], strict=False):
            line = int(where.rsplit(":", 1)[1])
            row = rows[line - 1]
            messages = row.get("messages") or [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]},
            ]
            # The whole sample, and only it, sits in this document: its text minus the last token ("\n").
            assert chat.decode(input_ids[start:end].tolist()) == chat.render(messages)[:-1]
            assert torch.equal(position_ids[start:end], torch.arange(end - start))
            assert labels[end - 1] == IGNORE_INDEX  # never predicts the next document
            seen.append(where)
        tail = docs[len(train.sources[i]) :]
        for start, end in tail:  # at most one padding document
            assert (input_ids[start:end] == chat.pad_id).all() and (labels[start:end] == IGNORE_INDEX).all()
        assert len(tail) <= 1
    assert sorted(seen) == sorted(f"{file}:{n}" for n in range(1, 41))  # every sample exactly once
    again, _ = build([file], chat, seq_len, packing=True, seed=3)
    assert again.sources == train.sources and (again.input_ids_NS == train.input_ids_NS).all()
    other, _ = build([file], chat, seq_len, packing=True, seed=4)
    assert other.sources != train.sources


def test_padding_mode_one_sample_per_sequence(tmp_path: Path, chat: ChatTokenizer) -> None:
    train, _ = build([write_jsonl(tmp_path / "t.jsonl", make_rows(6))], chat, 64, packing=False)
    assert len(train) == 6 and all(len(s) == 1 for s in train.sources) and train.stats.truncated == 0
    for i in range(len(train)):
        input_ids, labels, position_ids = train[i]
        docs = documents(position_ids)
        assert len(docs) == 2  # the sample, then its padding restarting at position 0
        (_, n), (pad_start, pad_end) = docs
        assert pad_start == n and pad_end == 64
        assert (input_ids[n:] == chat.pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (input_ids[:n] != chat.pad_id).all() and (labels[:n] != IGNORE_INDEX).any()


def test_truncation_policies(tmp_path: Path, chat: ChatTokenizer) -> None:
    rows = [
        {"prompt": "short", "response": "ok"},
        {"prompt": "p", "response": " ".join(["long"] * 60)},  # response cut part-way: kept, truncated
        {"prompt": " ".join(["huge"] * 60), "response": "lost"},  # response entirely cut: dropped
    ]
    file = write_jsonl(tmp_path / "t.jsonl", rows)
    seq_len = 24
    train, _ = build([file], chat, seq_len, truncation="truncate", packing=False)
    assert (train.stats.samples, train.stats.truncated, train.stats.dropped) == (2, 1, 0 + 1)
    long_index = next(i for i, s in enumerate(train.sources) if s == (f"{file}:2",))
    input_ids, labels, position_ids = train[long_index]
    assert torch.equal(position_ids, torch.arange(seq_len))  # exactly fills the sequence, no padding
    full = chat.encode(
        chat.render([{"role": "user", "content": "p"}, {"role": "assistant", "content": rows[1]["response"]}])
    )
    assert input_ids.tolist() == full[:seq_len]  # keeps the start
    assert (labels != IGNORE_INDEX).sum() > 0 and labels[-1] == full[seq_len]  # loss up to the cut

    dropped, _ = build([file], chat, seq_len, truncation="drop", packing=False)
    assert (dropped.stats.samples, dropped.stats.truncated, dropped.stats.dropped) == (1, 0, 2)
    assert dropped.sources == [(f"{file}:1",)]


# ----- bad rows -----
BAD_LINES: dict[int, tuple[str, str]] = {
    # line: (raw row, expected reason)
    3: ('{"messages": [', "not valid JSON"),
    5: ('{"text": "hi"}', "missing key 'messages'"),
    6: (
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
        "'content' must be a string",
    ),
    7: ('{"messages": []}', "'messages' is empty"),
    8: ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
    9: ('{"messages": [{"role": "asistant", "content": "q"}]}', "unknown role 'asistant'"),
    10: ('["a", "list"]', "expected a JSON object"),
    11: ('{"prompt": "q"}', "missing key 'response'"),
    12: ('{"messages": "hi"}', "'messages' must be a list"),
}


def bad_file(tmp_path: Path) -> str:
    good = json.dumps({"prompt": "q", "response": "a"})
    # Line 4 is blank: ignored, but still counted for numbering.
    lines = {1: good, 2: good, 4: "   ", 13: good}
    lines.update({n: raw for n, (raw, _) in BAD_LINES.items()})
    return write_jsonl(tmp_path / "bad.jsonl", [lines[n] for n in range(1, 14)])


def test_bad_rows_skipped_with_line_numbers(
    tmp_path: Path, chat: ChatTokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    file = bad_file(tmp_path)
    train, _ = build([file], chat, 64, on_bad_row="skip")
    assert train.stats.samples == 3 and train.stats.rows == 12
    assert [b.where for b in train.stats.bad_rows] == [f"{file}:{n}" for n in BAD_LINES]
    for bad in train.stats.bad_rows:
        assert BAD_LINES[int(bad.where.rsplit(":", 1)[1])][1] in bad.reason
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one summary line
    assert f"skipped {len(BAD_LINES)} bad rows of 12" in err[0]
    assert (
        f"{file}:3: not valid JSON" in err[0]
        and f"{file}:5: missing key" in err[0]
        and f"{file}:6:" in err[0]
    )
    assert f"{file}:7:" not in err[0]  # only the first few are named


def test_bad_row_error_names_file_and_line(tmp_path: Path, chat: ChatTokenizer) -> None:
    good = json.dumps({"prompt": "q", "response": "a"})
    for raw, reason in BAD_LINES.values():
        file = write_jsonl(tmp_path / "one.jsonl", [good, "", raw])
        with pytest.raises(DataError, match=rf"one\.jsonl:3: .*{reason}.*on_bad_row=skip") as info:
            build([file], chat, 64, on_bad_row="error")
        assert "\n" not in str(info.value)


def test_bad_json_names_the_column_an_editor_shows(tmp_path: Path) -> None:
    """The column counts characters from 1, not bytes: the non-ASCII text before the error would move a byte count."""
    line = '{"prompt": "héllo ✓ 你好", "response": "a",, }'
    file = write_jsonl(tmp_path / "one.jsonl", [line])
    (bad,) = list(read_rows(file))
    assert isinstance(bad, BadRow) and bad.where == f"{file}:1"
    column = line.index(",,") + 2  # the second comma
    assert len(line[: column - 1].encode("utf-8")) + 1 != column
    assert bad.reason.endswith(f"at column {column})"), bad.reason


def test_missing_file_and_empty_result(tmp_path: Path, chat: ChatTokenizer) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build([str(tmp_path / "nope.jsonl")], chat, 64)
    only_bad = write_jsonl(tmp_path / "b.jsonl", ["{oops"])
    with pytest.raises(DataError, match="no usable training samples"):
        build([only_bad], chat, 64, on_bad_row="skip")


# ----- validation split -----
def test_validation_fraction_is_deterministic_and_disjoint(tmp_path: Path, chat: ChatTokenizer) -> None:
    file = write_jsonl(tmp_path / "t.jsonl", make_rows(40))

    def split(seed: int) -> tuple[set[str], set[str]]:
        train, val = build([file], chat, 64, val_fraction=0.25, seed=seed)
        assert val is not None
        return {w for s in train.sources for w in s}, {w for s in val.sources for w in s}

    train_a, val_a = split(0)
    assert len(val_a) == 10 and len(train_a) == 30 and not train_a & val_a
    assert split(0) == (train_a, val_a)
    assert split(1)[1] != val_a
    # The split is by rows, so it does not depend on the sequence length.
    _, val_long = build([file], chat, 256, val_fraction=0.25, seed=0)
    assert val_long is not None and {w for s in val_long.sources for w in s} == val_a

    no_val = build([file], chat, 64)[1]
    assert no_val is None
    with pytest.raises(ConfigError, match="sft.val_fraction"):
        build([write_jsonl(tmp_path / "one.jsonl", make_rows(1))], chat, 64, val_fraction=0.25)


def test_validation_file(tmp_path: Path, chat: ChatTokenizer) -> None:
    train_file = write_jsonl(tmp_path / "t.jsonl", make_rows(8))
    val_file = write_jsonl(tmp_path / "v.jsonl", make_rows(3, seed=1))
    train, val = build([train_file], chat, 64, val_file=val_file)
    assert val is not None and val.stats.samples == 3 and train.stats.samples == 8
    assert {w.rsplit(":", 1)[0] for s in val.sources for w in s} == {val_file}


def test_config_section() -> None:
    cfg = build_section(SFTDataConfig, {"train_files": ["a.jsonl"], "on_bad_row": "skip"}, "sft")
    assert (cfg.packing, cfg.truncation, cfg.on_bad_row, cfg.val_fraction) == (True, "truncate", "skip", 0.0)
    with pytest.raises(ConfigError, match="sft.val_fraction"):
        build_section(SFTDataConfig, {"val_file": "v.jsonl", "val_fraction": 0.1}, "sft")
    with pytest.raises(ConfigError, match="sft.truncation"):
        build_section(SFTDataConfig, {"truncation": "cut"}, "sft")


# ----- micro-batches -----
def test_micro_batch_stream_yields_triples_in_the_same_order_on_any_world_size(
    tmp_path: Path, chat: ChatTokenizer
) -> None:
    train, _ = build([write_jsonl(tmp_path / "t.jsonl", make_rows(30))], chat, 32, packing=False)

    def stream(rank: int, dp: int) -> MicroBatchStream:
        return MicroBatchStream(train, 8, 2, rank, dp, seed=5, collate=collate_sft)

    one = [mb for _ in range(2) for mb in stream(0, 1).next_step()]
    input_ids, labels, position_ids = one[0]
    assert input_ids.shape == labels.shape == position_ids.shape == (2, 32) and input_ids.dtype == torch.long
    two = [stream(r, 2) for r in range(2)]
    per_rank = [[s.next_step() for _ in range(2)] for s in two]
    merged = [mb for g in range(2) for r in range(2) for mb in per_rank[r][g]]
    ref = stream(0, 1)
    ref_steps = [mb for _ in range(2) for mb in ref.next_step()]
    for a, b in zip(merged, ref_steps, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="as_pairs or collate"):
        MicroBatchStream(train, 8, 2, 0, 1, as_pairs=True, collate=collate_sft)


# ----- a foreign HF tokenizer folder -----
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
FOREIGN_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with other special tokens (at other ids) and a Llama-3-style template that trims content."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", *FOREIGN_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        [" ".join(CONVERSATION[i]["content"] for i in range(5))] * 20, trainer=trainer
    )
    folder = tmp_path_factory.mktemp("foreign")
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
        "pad_token": "<|end_of_text|>",
        "chat_template": LLAMA3_STYLE_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_foreign_template_masks(tmp_path: Path, foreign_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = ChatTokenizer.from_dir(foreign_dir)
    assert chat.pad_id == 2 and chat.special_tokens["eos_token"] == "<|eot_id|>"
    # Rendering is transformers' apply_chat_template, special-token variables included.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(foreign_dir))
    assert chat.render(CONVERSATION) == hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert chat.render(CONVERSATION).startswith("<|begin_of_text|><|start_header_id|>system")

    rows = [{"messages": CONVERSATION}, {"prompt": "q", "response": " padded "}]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
    )
    file = write_jsonl(tmp_path / "f.jsonl", rows)
    train, _ = build([file], foreign_dir, 96, packing=False, on_bad_row="skip")
    expected = {
        f"{file}:1": [m["content"].strip() + "<|eot_id|>" for m in CONVERSATION if m["role"] == "assistant"],
        f"{file}:2": ["padded<|eot_id|>"],
    }
    assert {s for (s,) in train.sources} == set(expected)
    for i in range(len(train)):
        input_ids, labels, _ = train[i]
        assert [chat.decode(run) for run in loss_runs(labels)] == expected[train.sources[i][0]]
        assert input_ids[0] == chat.backend.token_to_id("<|begin_of_text|>")
    (bad,) = train.stats.bad_rows
    assert bad.where == f"{file}:3" and "Conversation roles must alternate" in bad.reason


def test_refuses_tokenizer_that_prepends_text(tmp_path: Path) -> None:
    backend = HFTokenizer(models.BPE())
    backend.normalizer = normalizers.Prepend(" ")  # sentencepiece-style prefix space on every encode call
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["ab"],
        trainers.BpeTrainer(special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "</s>", "chat_template": LLAMA3_STYLE_TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(DataError, match="adds nothing per encode call"):
        ChatTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), encoding="utf-8")
    with pytest.raises(DataError, match="has no chat template"):
        ChatTokenizer.from_dir(tmp_path)


def test_the_options_table_in_the_docs_matches_the_code() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "sft.md").read_text(encoding="utf-8")
    for name, typ, default, meaning in section_docs(SFTDataConfig):
        shown = (
            f"`{default!r}`" if default in ("", []) else f"`{default}`"
        )  # as docs/config.md shows defaults
        row = f"| `sft.{name}` | {typ} | {shown} | {meaning} |"
        assert row in doc, f"docs/sft.md is stale for sft.{name}: expected the row\n{row}"
