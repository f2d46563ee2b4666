from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from framework.config.sections import SFTDataConfig
from framework.data.labels import IGNORE_INDEX
from framework.data.sft import build_sft_datasets
from framework.data.sft_tasks import (
    TASKS,
    WARMUP_TASKS,
    exact_match,
    generate_rows,
    main,
    normalize_answer,
    prompt_and_reference,
    write_task,
)
from framework.data.tokenizer import Tokenizer


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def solve(prompt: str) -> str:
    """An independent solver of the task prompts."""
    task, _, args = prompt.partition(": ")
    if task == "add":
        a, b = ("".join(side.split()) for side in args.split(" + "))
        return " ".join(str(int(a) + int(b)))
    letters = args.split()
    if task == "count":
        return str(len(letters))
    return " ".join(
        {
            "reverse": letters[::-1],
            "upper": [x.upper() for x in letters],
            "sort": sorted(letters),
            "copy": letters,
            "first": letters[:1],
            "last": letters[-1:],
        }[task]
    )


def test_rows_are_correct_balanced_and_small(tmp_path: Path) -> None:
    train_path, val_path = write_task(tmp_path, 400, 40, seed=7)
    train, val = read(train_path), read(val_path)
    assert (len(train), len(val)) == (400, 40)
    for row in train + val:
        messages, reference = prompt_and_reference(row)
        assert [m["role"] for m in messages] == ["user"] and row["messages"][-1]["role"] == "assistant"
        assert row["task"] == messages[0]["content"].split(":")[0]
        assert reference == solve(messages[0]["content"])
        assert set(reference) <= set("0123456789abcdefghijABCDEFGHIJ ")  # tiny answer vocabulary
        assert len(reference.split()) <= 6
    assert Counter(r["task"] for r in train) == dict.fromkeys(TASKS, 100)
    train_prompts = {r["messages"][0]["content"] for r in train}
    val_prompts = {r["messages"][0]["content"] for r in val}
    assert len(train_prompts) == 400 and len(val_prompts) == 40 and not train_prompts & val_prompts


def test_warmup_rows_are_correct_and_share_no_task_with_the_default_mix(tmp_path: Path) -> None:
    train_path, _ = write_task(tmp_path, 80, 0, seed=1, tasks=WARMUP_TASKS)
    rows = read(train_path)
    assert Counter(r["task"] for r in rows) == dict.fromkeys(WARMUP_TASKS, 20)
    for row in rows:
        messages, reference = prompt_and_reference(row)
        assert reference == solve(messages[0]["content"])
    assert not set(WARMUP_TASKS) & set(TASKS)
    assert {r["task"] for r in read(write_task(tmp_path / "d", 40, 0, seed=1)[0])} == set(TASKS)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = write_task(tmp_path / "a", 50, 10, seed=3)
    b = write_task(tmp_path / "b", 50, 10, seed=3)
    c = write_task(tmp_path / "c", 50, 10, seed=4)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    # Validation rows do not depend on how many training rows are asked for.
    d = write_task(tmp_path / "d", 80, 10, seed=3)
    assert d[1].read_bytes() == a[1].read_bytes()


def test_generation_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate_rows(4, 0, tasks=["divide"])
    with pytest.raises(ValueError, match="ran out of distinct prompts"):
        generate_rows(200, 0, tasks=["add"], max_digits=1)  # only 100 distinct 1-digit sums exist


def test_exact_match_and_normalisation() -> None:
    assert normalize_answer("  1 3\t 2 <|im_end|>\n<|im_start|>user") == "1 3 2"
    assert normalize_answer("J A<|endoftext|>junk") == "J A"
    assert exact_match(["1 3 2<|im_end|>", " J  A ", "j a", "b c"], ["1 3 2", "J A", "J A", "b c"]) == 0.75
    assert exact_match(["x"], ["y"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match([], [])


def test_cli_output_trains_on_the_answers(
    tmp_path: Path, small_tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--output", str(tmp_path), "--train", "24", "--val", "8", "--seed", "1"]) == 0
    assert "wrote 24 rows" in capsys.readouterr().out
    train_path, val_path = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    cfg = SFTDataConfig(train_files=[str(train_path)], val_file=str(val_path), packing=False)
    train, val = build_sft_datasets(cfg, small_tokenizer, 64)
    assert val is not None and (train.stats.samples, val.stats.samples) == (24, 8)
    answers = {f"{train_path}:{i}": prompt_and_reference(r)[1] for i, r in enumerate(read(train_path), 1)}
    for i in range(len(train)):
        _, labels, _ = train[i]
        text = small_tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
        assert text == answers[train.sources[i][0]] + "<|im_end|>"
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--tasks", "divide"])
