from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from data_testutils import make_documents

from framework.data.errors import DataError
from framework.data.indexed import open_indexed
from framework.data.prepare import add_prepare_arguments, prepare, run_prepare
from framework.data.tokenizer import Tokenizer


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


def test_text_and_jsonl_inputs(tmp_path: Path, small_tokenizer_dir: Path, small_tokenizer: Tokenizer) -> None:
    docs = make_documents(5)
    (tmp_path / "texts").mkdir()
    for i, doc in enumerate(docs[:2]):
        (tmp_path / "texts" / f"{i}.txt").write_text(doc, encoding="utf-8")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[2:])]
    (tmp_path / "more.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "mix"

    code = run_prepare(
        _parse(
            [
                "--input",
                str(tmp_path / "texts"),
                str(tmp_path / "more.jsonl"),
                "--output",
                str(out),
                "--tokenizer",
                str(small_tokenizer_dir),
                "--no-progress",
            ]
        )
    )
    assert code == 0
    dataset = open_indexed(out)
    assert len(dataset) == 5
    for i, doc in enumerate(
        docs
    ):  # folder files first (sorted), then JSONL lines in order; blank line skipped
        assert dataset[i].tolist() == small_tokenizer.encode(doc, parse_special=False) + [small_tokenizer.eod]
    assert Tokenizer.from_dir(str(out) + ".tokenizer").fingerprint == small_tokenizer.fingerprint


def test_malformed_jsonl_line_is_reported_with_file_and_line(
    tmp_path: Path, small_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:3: not valid JSON"):
        prepare([str(bad)], str(tmp_path / "out"), str(small_tokenizer_dir), progress=False)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing half-written

    code = run_prepare(
        _parse(["-i", str(bad), "-o", str(tmp_path / "out"), "--tokenizer", str(small_tokenizer_dir)])
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and err.count("\n") == 1


def test_missing_text_field_and_missing_input(tmp_path: Path, small_tokenizer_dir: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{rows}:2: expected an object with a string field 'text'"):
        prepare([str(rows)], str(tmp_path / "o"), str(small_tokenizer_dir), progress=False)
    only_body = tmp_path / "body.jsonl"
    only_body.write_text('{"body": "from another field"}\n', encoding="utf-8")
    result = prepare(
        [str(only_body)], str(tmp_path / "b"), str(small_tokenizer_dir), text_key="body", progress=False
    )
    assert result.info.num_documents == 1
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "nope.txt")], str(tmp_path / "o"), str(small_tokenizer_dir))
    assert not os.path.exists(tmp_path / "o.bin")
