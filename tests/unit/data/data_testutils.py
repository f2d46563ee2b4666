"""Helpers shared by the data tests (a uniquely named module: the test folders are not packages)."""

from __future__ import annotations

import random
from pathlib import Path

from framework.data.indexed import write_indexed
from framework.data.tokenizer import Tokenizer, TokenizerSettings

SMALL_SETTINGS = TokenizerSettings(vocab_size=512, min_frequency=2, model_max_length=512)
WORDS = [
    "def",
    "return",
    "self",
    "import",
    "class",
    "value",
    "data",
    "token",
    "expert",
    "router",
    "batch",
    "model",
    "layer",
    "(",
    ")",
    ":",
    "=",
    "+",
    "\n",
    "    ",
    "for",
    "in",
    "if",
    "else",
    "x",
    "y",
    "0",
    "1",
]


def make_documents(
    count: int, seed: int = 0, words: list[str] | None = None, length: tuple[int, int] = (80, 240)
) -> list[str]:
    """``count`` deterministic pseudo-code documents; document ``i`` starts with the marker ``doc{i}``."""
    rng = random.Random(seed)
    vocab = words or WORDS
    return [
        f"doc{i} " + " ".join(rng.choice(vocab) for _ in range(rng.randint(*length))) for i in range(count)
    ]


def write_prefix(folder: Path, name: str, docs: list[str], tokenizer: Tokenizer) -> str:
    """Write ``docs`` as ``folder/name.bin/.idx`` with the tokenizer in ``folder/name.tokenizer``; return the prefix."""
    prefix = str(folder / name)
    write_indexed(docs, tokenizer, prefix, progress=False)
    tokenizer.save(prefix + ".tokenizer")
    return prefix
