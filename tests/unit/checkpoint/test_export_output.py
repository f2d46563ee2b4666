"""Exports never delete what the user did not ask to delete: an existing non-empty output folder is refused (one
error line naming it and ``--overwrite``); with ``--overwrite`` only the files a previous export listed in its
``export.json`` are replaced, everything else in the folder is kept. Real checkpoints of a tiny Llama (as the
store writes them), exported through the ``expertrain`` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from framework.checkpoint.export import ExportOutputError, export_native, prepare_output  # noqa: E402
from framework.cli import main as cli_main  # noqa: E402
from tests.unit.checkpoint.test_export_streamed import _checkpoint  # noqa: E402


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder with a checkpoint, metrics and a TensorBoard log, as training leaves it."""
    checkpoint = _checkpoint(tmp_path, "llama")
    run = checkpoint.parent.parent
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n', encoding="utf-8")
    (run / "tb").mkdir()
    (run / "tb" / "events.out").write_bytes(b"log")
    return run


def _export(fmt: str, checkpoint: Path, output: Path, *extra: str) -> int:
    return cli_main(["export", fmt, "--checkpoint", str(checkpoint), "--output", str(output), *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_export_into_a_run_folder_is_refused_and_deletes_nothing(
    run_folder: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _tree(run_folder)
    assert _export(fmt, run_folder, run_folder) == 2
    line = _one_error_line(capsys)
    assert str(run_folder) in line and "--overwrite" in line and "not empty" in line
    assert _tree(run_folder) == before
    assert not any(p.name.endswith(".partial") for p in run_folder.parent.iterdir())


def test_overwrite_into_a_run_folder_keeps_checkpoints_metrics_and_logs(
    run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _tree(run_folder)
    assert _export("hf", run_folder, run_folder, "--overwrite") == 0
    after = _tree(run_folder)
    assert all(after.get(name) == data for name, data in before.items()), "a file of the run changed"
    written = json.loads((run_folder / "export.json").read_text())["files"]
    assert "config.json" in written and all((run_folder / name).is_file() for name in written)


def test_overwrite_replaces_only_the_previous_exports_files(
    run_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    assert _export("hf", run_folder, out, "--max-shard-bytes", "20000") == 0
    sharded = json.loads((out / "export.json").read_text())["files"]
    assert sum(name.startswith("model-") for name in sharded) > 1
    (out / "README.md").write_text("the user's notes", encoding="utf-8")

    assert _export("hf", run_folder, out, "--overwrite") == 0
    one_file = json.loads((out / "export.json").read_text())["files"]
    left = {p.name for p in out.iterdir()}
    assert left == {*one_file, "export.json", "README.md"}, "stale shards of the first export were kept"
    assert (out / "README.md").read_text() == "the user's notes"


def test_native_overwrite_removes_its_previous_files_and_keeps_unknown_ones(
    run_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "native"
    written = export_native(run_folder, out)
    (out / "stale_adapter.safetensors").write_bytes(b"x")  # not listed by the previous export: kept
    record = json.loads((out / "export.json").read_text())
    (out / "old_plugin_file.bin").write_bytes(b"y")  # listed as a previous export's file: removed
    record["files"].append("old_plugin_file.bin")
    (out / "export.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ExportOutputError, match="--overwrite"):
        export_native(run_folder, out)
    assert export_native(run_folder, out, overwrite=True) == written
    assert {p.name for p in out.iterdir()} == {*written, "export.json", "stale_adapter.safetensors"}


def test_a_previous_record_never_removes_files_outside_the_output(run_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "native"
    export_native(run_folder, out)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep", encoding="utf-8")
    record = json.loads((out / "export.json").read_text())
    record["files"] += ["../precious.txt", str(outside)]
    (out / "export.json").write_text(json.dumps(record), encoding="utf-8")
    export_native(run_folder, out, overwrite=True)
    assert outside.read_text() == "keep"


def test_an_output_that_is_a_file_is_one_error_line(
    run_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    assert _export("native", run_folder, target, "--overwrite") == 2
    line = _one_error_line(capsys)
    assert str(target) in line and "is a file" in line
    assert target.read_bytes() == b"not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_error_line(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ExportOutputError, match="read-only"):
            prepare_output(folder / "export", overwrite=False)
    finally:
        folder.chmod(0o755)


def test_an_empty_existing_folder_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert prepare_output(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
