"""``expertrain data prepare``: turn text files or JSONL into an indexed dataset for ``data.paths``.

Inputs: plain text files (one document per file, read as UTF-8), JSONL files (``*.jsonl``: one JSON object per line
with a string field ``text``, or ``--text-key``; blank lines are skipped), or folders (their files, recursively,
sorted). Output, for ``--output PREFIX``::

    PREFIX.bin  PREFIX.idx     megatron-core indexed dataset: each document's tokens followed by <|endoftext|>
    PREFIX.tokenizer/          tokenizer.json + tokenizer_config.json used to encode it

Without ``--tokenizer`` the embedded corpus tokenizer is used (trained and cached on first use, ~3 s), so prepared
data blends with the embedded corpus and with other data prepared the same way. Training finds
``PREFIX.tokenizer`` by itself when ``data.tokenizer`` is empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from framework.data.embedded import embedded_tokenizer_dir
from framework.data.errors import DataError
from framework.data.indexed import IndexInfo, write_indexed
from framework.data.tokenizer import Tokenizer

JSONL_SUFFIXES: tuple[str, ...] = (".jsonl",)


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` wrote."""

    prefix: str
    tokenizer_dir: str
    info: IndexInfo


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (folders expand to their files, recursively, sorted); missing ones raise DataError."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise DataError(f"input folder '{path}' contains no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(
                f"input '{path}' does not exist; pass text files, .jsonl files or folders to --input"
            )
    if not files:
        raise DataError("no input files; pass text files, .jsonl files or folders to --input")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); convert it or leave it out") from None


def iter_jsonl(path: Path, text_key: str = "text") -> Iterator[str]:
    """The ``text_key`` string of each non-blank line; a bad line raises DataError naming ``file:line``."""
    with open(path, "rb") as stream:
        for lineno, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err}); fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field '{text_key}'")
            yield record[text_key]


def iter_documents(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """Documents of ``files`` in order: one per text file, one per JSONL line."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from iter_jsonl(path, text_key)
        else:
            yield _read_text(path)


def prepare(
    inputs: list[str],
    output_prefix: str,
    tokenizer_dir: str | None = None,
    *,
    text_key: str = "text",
    cache_dir: str | None = None,
    progress: bool | None = None,
) -> PrepareResult:
    """Tokenise ``inputs`` into ``output_prefix.bin/.idx`` and copy the tokenizer to ``output_prefix.tokenizer/``.

    ``tokenizer_dir`` None means the embedded corpus tokenizer (cached under ``cache_dir``). Nothing is left at
    ``output_prefix`` when an input turns out to be bad (the files are written under temporary names first).
    """
    files = expand_inputs(inputs)
    prefix = os.fspath(Path(output_prefix).expanduser())
    if prefix.endswith((".bin", ".idx")):
        raise DataError(f"--output '{output_prefix}' is a prefix: drop the extension ('{prefix[:-4]}')")
    if Path(prefix).is_dir():
        raise DataError(f"--output '{output_prefix}' is a folder; give a prefix such as '{prefix}/data'")
    source_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir else embedded_tokenizer_dir(cache_dir)
    tokenizer = Tokenizer.from_dir(source_dir)
    has_jsonl = any(p.suffix.lower() in JSONL_SUFFIXES for p in files)
    info = write_indexed(
        iter_documents(files, text_key),
        tokenizer,
        prefix,
        total=None if has_jsonl else len(files),
        progress=progress,
        desc=f"tokenising {len(files)} file(s)",
    )
    out_tok = Path(prefix + ".tokenizer")
    if out_tok.resolve() != source_dir.resolve():
        tmp = out_tok.with_name(out_tok.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save(tmp)
        shutil.rmtree(out_tok, ignore_errors=True)
        os.rename(tmp, out_tok)
    return PrepareResult(prefix=prefix, tokenizer_dir=str(out_tok), info=info)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``expertrain data prepare``'s options to ``parser`` (the CLI's ``prepare`` subparser)."""
    parser.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help="text files (one document each), .jsonl files (one document per line) or folders",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.bin, PREFIX.idx, PREFIX.tokenizer/",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="tokenizer folder (default: the embedded corpus tokenizer)",
    )
    parser.add_argument(
        "--text-key", default="text", help="JSONL field holding the document text (default: text)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="cache for the embedded tokenizer (default: ~/.cache/expertrain)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``expertrain data prepare`` with parsed ``args``; print a summary (or one error line) and return 0 (or 1)."""
    try:
        result = prepare(
            list(args.input),
            args.output,
            args.tokenizer,
            text_key=args.text_key,
            cache_dir=args.cache_dir,
            progress=False if args.no_progress else None,
        )
    except DataError as err:
        print(f"expertrain data prepare: error: {err}", file=sys.stderr)
        return 1
    info = result.info
    print(
        f"wrote {info.prefix}.bin/.idx: {info.num_documents} documents, {info.num_tokens} tokens; "
        f"tokenizer in {result.tokenizer_dir}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m framework.data prepare --input ... --output ...``)."""
    parser = argparse.ArgumentParser(prog="expertrain data prepare", description=__doc__.split("\n")[0])
    add_prepare_arguments(parser)
    return run_prepare(parser.parse_args(argv))
