"""A generated chat task for SFT smoke runs: short, deterministic answers a tiny model learns in minutes on CPU.

Four sub-tasks, each a user turn and an assistant turn (rows in the format of :mod:`framework.data.sft`, plus a
``"task"`` key that SFT ignores and evaluation can group by)::

    add: 4 7 + 8 5        ->  1 3 2        (numbers of 1..max_digits digits)
    reverse: c a j b      ->  b j a c      (3..6 letters from a..j)
    upper: c a j b        ->  C A J B
    sort: c a j b         ->  a b c j

and four warm-up sub-tasks (:data:`WARMUP_TASKS`, never in the default mix) that teach the format, not the skills::

    copy: c a j b         ->  c a j b
    first: c a j b        ->  c
    last: c a j b         ->  b
    count: c a j b        ->  4        (1..9 letters)

Letters and digits are space-separated so that every symbol is its own token under a byte-level BPE (merged chunks
such as ``cajb`` would hide the letters a reversal needs), which keeps the vocabulary tiny and the task learnable.
Rows cycle through the sub-tasks (balanced mix). Validation rows are drawn first from their own seeded stream and
training rows never repeat a validation prompt, so validation measures generalisation, not recall.

Scoring: :func:`exact_match` compares :func:`normalize_answer` of prediction and reference: cut at the first
``<|im_end|>`` or ``<|endoftext|>``, then strip and collapse whitespace runs to one space; case-sensitive (``upper``
depends on case).

CLI: ``python -m framework.data.sft_tasks --output DIR --train N --val M --seed S`` writes ``DIR/train.jsonl`` and
``DIR/val.jsonl`` (byte-identical for the same arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = ("add", "reverse", "upper", "sort")
WARMUP_TASKS: tuple[str, ...] = ("copy", "first", "last", "count")
"""Chat-format tasks disjoint from :data:`TASKS`: a base warmed up on them has seen the chat template, the spaced
letters and digits, but none of the skills :data:`TASKS` ask for (``benchmarks/reproduce.py``'s fine-tuning base)."""
ALL_TASKS: tuple[str, ...] = TASKS + WARMUP_TASKS
LETTERS = "abcdefghij"
MIN_LETTERS, MAX_LETTERS = 3, 6
STOP_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"


def _spaced(symbols: Sequence[str] | str) -> str:
    return " ".join(symbols)


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS))]


def make_example(task: str, rng: random.Random, max_digits: int = 2) -> tuple[str, str]:
    """One ``(prompt, answer)`` of ``task`` drawn from ``rng``."""
    if task == "add":
        a, b = (rng.randint(0, 10**max_digits - 1) for _ in range(2))
        return f"add: {_spaced(str(a))} + {_spaced(str(b))}", _spaced(str(a + b))
    if task == "count":
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(1, 9))]
        return f"count: {_spaced(letters)}", str(len(letters))
    letters = _letters(rng)
    transforms: dict[str, Callable[[list[str]], list[str]]] = {
        "reverse": lambda xs: xs[::-1],
        "upper": lambda xs: [x.upper() for x in xs],
        "sort": sorted,
        "copy": list,
        "first": lambda xs: xs[:1],
        "last": lambda xs: xs[-1:],
    }
    if task not in transforms:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(ALL_TASKS)}")
    return f"{task}: {_spaced(letters)}", _spaced(transforms[task](letters))


def task_row(task: str, prompt: str, answer: str) -> dict[str, Any]:
    """The JSONL row of one example."""
    return {
        "task": task,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


def generate_rows(
    count: int,
    seed: int,
    *,
    tasks: Sequence[str] = TASKS,
    max_digits: int = 2,
    exclude: set[str] | None = None,
) -> list[dict[str, Any]]:
    """``count`` rows cycling through ``tasks``, drawn from ``random.Random(seed)``; no prompt repeats within the rows
    or appears in ``exclude``. Raises ValueError when the prompt space is too small for ``count``."""
    for task in tasks:
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(ALL_TASKS)}")
    if not tasks:
        raise ValueError("no tasks given")
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        for _ in range(1000):
            prompt, answer = make_example(task, rng, max_digits)
            if prompt not in seen:
                break
        else:
            raise ValueError(f"task {task!r} ran out of distinct prompts after {i} rows; ask for fewer rows")
        seen.add(prompt)
        rows.append(task_row(task, prompt, answer))
    return rows


def write_task(
    output: str | os.PathLike[str],
    train: int,
    val: int,
    seed: int,
    *,
    tasks: Sequence[str] = TASKS,
    max_digits: int = 2,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``val.jsonl`` into ``output`` (created); returns their paths."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    # Separate seeded streams: validation first, so its rows do not depend on the training count.
    val_rows = generate_rows(val, 2 * seed + 1, tasks=tasks, max_digits=max_digits)
    exclude = {row["messages"][0]["content"] for row in val_rows}
    train_rows = generate_rows(train, 2 * seed, tasks=tasks, max_digits=max_digits, exclude=exclude)
    paths = folder / TRAIN_FILE, folder / VAL_FILE
    for path, rows in zip(paths, (train_rows, val_rows), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def prompt_and_reference(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The messages to prompt with (all but the final assistant turn) and the reference answer of a row."""
    messages = row["messages"]
    return messages[:-1], messages[-1]["content"]


def normalize_answer(text: str) -> str:
    """Cut at the first stop marker, strip, collapse whitespace runs to one space (case kept)."""
    for marker in STOP_MARKERS:
        text = text.split(marker, 1)[0]
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize_answer` (0.0 .. 1.0)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("exact_match needs at least one reference")
    hits = sum(
        normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m framework.data.sft_tasks", description="Write the generated SFT task as JSONL."
    )
    parser.add_argument("--output", required=True, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--train", type=int, default=4000, help="training rows (default 4000)")
    parser.add_argument("--val", type=int, default=200, help="validation rows (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(ALL_TASKS)}"
    )
    parser.add_argument("--max-digits", type=int, default=2, help="digits per addend (default 2)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 0:
        parser.error("--train must be >= 1 and --val >= 0")
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        train_path, val_path = write_task(
            args.output, args.train, args.val, args.seed, tasks=tasks, max_digits=args.max_digits
        )
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.train} rows to {train_path} and {args.val} rows to {val_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
