"""Checkpoint store: round trip, atomic completion, pruning, refusing pickles."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from framework.checkpoint import CheckpointFormatError, CheckpointStore


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(store: CheckpointStore, step: int, model, opt, extra: dict | None = None) -> Path:
    msd, osd = get_state_dict(model, opt)
    state = {
        "model": msd,
        "optim": osd,
        "plugins": {"demo": {"mask": torch.arange(4), "stage": 3, "name": "x"}},
    }
    return store.save(
        step, state, {"samples_consumed": step * 10, **(extra or {})}, {"cpu": torch.get_rng_state()}
    )


def test_round_trip_restores_weights_optimizer_and_plain_values(tmp_path: Path) -> None:
    model, opt = _trained(0)
    store = CheckpointStore(tmp_path)
    path = _save(store, 5, model, opt)
    assert store.latest() == path

    other, other_opt = _trained(1)
    other_opt.param_groups[0]["lr"] = 0.5
    msd, osd = get_state_dict(other, other_opt)
    target = {"model": msd, "optim": osd, "plugins": {"demo": {"mask": torch.zeros(4, dtype=torch.long)}}}
    state, meta, rng = CheckpointStore.load(path, target)
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(opt.state_dict()["state"].items(), other_opt.state_dict()["state"].items()):
        assert ka == kb and all(torch.equal(a[k], b[k]) for k in a)
    assert other_opt.param_groups[0]["lr"] == 1e-3 and other_opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert torch.equal(state["plugins"]["demo"]["mask"], torch.arange(4))
    assert state["plugins"]["demo"]["stage"] == 3 and state["plugins"]["demo"]["name"] == "x"
    assert meta["samples_consumed"] == 50 and meta["step"] == 5
    assert "cpu" in rng


def test_interrupted_save_never_looks_complete(tmp_path: Path) -> None:
    model, opt = _trained(0)
    store = CheckpointStore(tmp_path)
    good = _save(store, 10, model, opt)
    # A save killed half-way: the tmp folder holds tensors but no meta.json, and latest still points to step 10.
    partial = tmp_path / "step_00000020.tmp"
    shutil.copytree(good, partial)
    (partial / "meta.json").unlink()
    assert store.latest() == good
    # Even a renamed folder without meta.json (e.g. copied by hand) is not taken as complete.
    shutil.copytree(partial, tmp_path / "step_00000030")
    assert store.latest() == good
    with pytest.raises(CheckpointFormatError, match="not a complete expertrain checkpoint"):
        CheckpointStore.read_meta(tmp_path / "step_00000030")


def test_latest_pointer_to_a_deleted_folder_falls_back(tmp_path: Path) -> None:
    model, opt = _trained(0)
    store = CheckpointStore(tmp_path, keep_last=5)
    first = _save(store, 1, model, opt)
    second = _save(store, 2, model, opt)
    shutil.rmtree(second)
    assert store.latest() == first


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    model, opt = _trained(0)
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _save(store, step, model, opt)
    assert [p.name for p in store.complete()] == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text() == "step_00000003"


def test_metadata_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    model, opt = _trained(0)
    path = _save(CheckpointStore(tmp_path), 1, model, opt)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    msd, osd = get_state_dict(model, opt)
    with pytest.raises(Exception, match="refusing to load it"):
        CheckpointStore.load(path, {"model": msd, "optim": osd})


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    model, opt = _trained(0)
    path = _save(CheckpointStore(tmp_path), 1, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointFormatError, match="format 99"):
        CheckpointStore.read_meta(path)
