"""Damaged checkpoints: each kind of damage is named in one line, and a resume falls back to the intact one or refuses.

The checkpoints are real: two gloo ranks save steps 1 and 2 through the store (each rank its own shard file and RNG
file), then each test damages a copy of step 2 the way a crash, a full disk or a bad disk would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointFormatError, CheckpointStore
from framework.checkpoint.manifest import MANIFEST
from framework.comm import collectives as C
from tests.distributed.spawn import run_ranks

NUMEL = 40_000  # 160 kB per rank: room for 64 KiB of zeros inside a shard


def _state(step: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return {"model": {f"w{rank}": torch.randn(NUMEL, generator=gen)}, "plugins": {"stage": step}}


def _rng(step: int, rank: int) -> dict[str, torch.Tensor]:
    return {"cpu": torch.full((4,), 10 * step + rank, dtype=torch.uint8)}


def _save_then_verify_damaged(rank: int, world: int, root: str) -> list[str]:
    """Save steps 1 and 2 on two ranks and keep a pristine copy; then damage a file that rank 1 verifies (the
    verdict has to reach rank 0) and resume on both ranks."""
    store = CheckpointStore(Path(root) / "run", keep_last=2)
    for step in (1, 2):
        store.save(
            step, _state(step, rank), {"samples_consumed": 8 * step, "world_size": world}, _rng(step, rank)
        )
    if rank == 0:
        shutil.copytree(store.root, Path(root) / "pristine")
        (store.root / "step_00000002" / "rng_rank1.safetensors").unlink()
    C.barrier()
    chosen = store.latest_verified("fallback")
    return [chosen.name, (store.root / "latest").read_text()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """(a folder holding ``pristine``: steps 1 and 2 saved by two ranks, what each rank resumed from)."""
    root = tmp_path_factory.mktemp("two-rank-checkpoints")
    return root, run_ranks(_save_then_verify_damaged, 2, str(root))


@pytest.fixture
def run(saved: tuple[Path, list[list[str]]], tmp_path: Path) -> Path:
    """A fresh copy of the pristine checkpoints folder."""
    return Path(shutil.copytree(saved[0] / "pristine", tmp_path / "checkpoints"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zeros_inside(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(bytes(64 << 10))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    """Random bytes of the file's own length (a size check alone cannot see it)."""
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def _drop_meta_key(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["samples_consumed"]
    path.write_text(json.dumps(meta))


# (damage, file it hits, words the one-line report must hold)
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "truncated shard": (_truncate, "__1_0.distcp", "truncated"),
    "truncated DCP metadata": (_truncate, ".metadata", "truncated"),
    "64 KiB of zeros inside a shard": (_zeros_inside, "__1_0.distcp", "checksum"),
    "0-byte shard": (_empty, "__0_0.distcp", "0 bytes"),
    "garbage RNG file of rank 0": (_garbage, "rng_rank0.safetensors", "checksum"),
    "missing RNG file of rank 1": (Path.unlink, "rng_rank1.safetensors", "missing"),
    "meta.json without samples_consumed": (_drop_meta_key, "meta.json", "lacks samples_consumed"),
    "truncated manifest": (_truncate, MANIFEST, "unreadable"),
}


def _damage(run: Path, kind: str) -> str:
    damage, name, _ = DAMAGE[kind]
    damage(run / "step_00000002" / name)
    return name


def test_intact_checkpoints_verify_and_the_newest_is_used(run: Path) -> None:
    store = CheckpointStore(run)
    assert store.verify(run / "step_00000001") is None and store.verify(run / "step_00000002") is None
    assert store.latest_verified("fail") == run / "step_00000002"


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_is_named_and_the_resume_falls_back_to_the_intact_step(
    run: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _damage(run, kind)
    store = CheckpointStore(run)
    report = store.verify(run / "step_00000002")
    assert report is not None and name in report and DAMAGE[kind][2] in report and "\n" not in report

    chosen = store.latest_verified("fallback")

    assert chosen == run / "step_00000001"
    assert name in capsys.readouterr().err
    assert (run / "latest").read_text() == "step_00000001"
    assert not (run / "step_00000002").exists() and (run / "step_00000002.damaged" / "meta.json").is_file()
    # What loads is exactly step 1 (an independent reference: the values regenerated from their seeds).
    target = {"model": {"w0": torch.zeros(NUMEL), "w1": torch.zeros(NUMEL)}, "plugins": {"stage": 0}}
    state, meta, rng = CheckpointStore.load(chosen, target)
    assert torch.equal(state["model"]["w0"], _state(1, 0)["model"]["w0"])
    assert torch.equal(state["model"]["w1"], _state(1, 1)["model"]["w1"])
    assert state["plugins"]["stage"] == 1 and meta["samples_consumed"] == 8
    assert torch.equal(rng["cpu"], _rng(1, 0)["cpu"])


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_on_damaged_fail_refuses_in_one_line_naming_the_file_and_moves_nothing(run: Path, kind: str) -> None:
    name = _damage(run, kind)
    with pytest.raises(CheckpointFormatError) as caught:
        CheckpointStore(run).latest_verified("fail")
    message = str(caught.value)
    assert name in message and "step_00000002" in message and "on_damaged=fallback" in message
    assert "\n" not in message
    assert (run / "step_00000002").is_dir() and (run / "latest").read_text() == "step_00000002"


def test_every_checkpoint_damaged_is_refused_and_nothing_is_moved(run: Path) -> None:
    _damage(run, "truncated shard")
    (run / "step_00000001" / "rng_rank0.safetensors").unlink()
    with pytest.raises(
        CheckpointFormatError,
        match="no intact checkpoint .* all 2 are damaged, the newest step_00000002 at .*__1_0.distcp",
    ):
        CheckpointStore(run).latest_verified("fallback")
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def test_ranks_verify_a_share_each_and_agree_on_the_fallback(saved: tuple[Path, list[list[str]]]) -> None:
    # rng_rank1 of step 2 was deleted; with two ranks that file is in rank 1's share.
    names = sorted(p.name for p in (saved[0] / "pristine" / "step_00000002").iterdir() if p.name != MANIFEST)
    assert "rng_rank1.safetensors" in names[1::2]
    assert saved[1] == [["step_00000001", "step_00000001"]] * 2


def test_the_shares_of_verify_together_find_what_one_full_pass_finds(run: Path) -> None:
    _damage(run, "64 KiB of zeros inside a shard")
    store = CheckpointStore(run)
    shares = [store.verify(run / "step_00000002", part=p, parts=3) for p in range(3)]
    assert [s for s in shares if s is not None] == [store.verify(run / "step_00000002")]


def test_checkpoint_without_manifest_still_loads_and_what_can_be_checked_is(run: Path) -> None:
    """Checkpoints saved before manifests: meta.json, .metadata, shard lengths and RNG files are still checked."""
    for step in (1, 2):
        (run / f"step_0000000{step}" / MANIFEST).unlink()
    store = CheckpointStore(run)
    assert store.latest_verified("fail") == run / "step_00000002"
    (run / "step_00000002" / "rng_rank1.safetensors").unlink()
    assert "rng_rank1.safetensors: missing (saved by 2 ranks)" in (store.verify(run / "step_00000002") or "")
    _truncate(run / "step_00000001" / "__1_0.distcp")
    assert "__1_0.distcp" in (store.verify(run / "step_00000001") or "")


def test_required_meta_keys_of_the_caller_are_checked(run: Path) -> None:
    store = CheckpointStore(run, required_meta=("samples_consumed", "tokens_seen"))
    assert "lacks tokens_seen" in (store.verify(run / "step_00000002") or "")
