"""Checkpoints that cannot run code, cannot load silently corrupted, and fail loudly but cleanly.

In-process, in a world of one: saves through ``platform/checkpoint.py`` itself, then the
attacks: a crafted pickle, a flipped 4 KiB block, a truncated shard, junk folders, a full disk.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle

import pytest
import torch

from omnidiff.platform import checkpoint
from omnidiff.platform.checkpoint import (
    CheckpointError, CheckpointWriteError, checkpoint_root, resolve_resume)


def _state(step: int) -> dict:
    return {"engine": {"model": {"w": torch.full((4096,), float(step))}}, "step": step,
            "data": {"open": [{"tokens": torch.arange(5), "task": "asr"}]}}


SAVED_RNG = {}


@pytest.fixture
def saved(tmp_path, single_process):
    """Checkpoints of steps 1 and 2 in ``tmp_path``; the root folder of them."""
    for step in (1, 2):
        torch.manual_seed(step)
        SAVED_RNG[step] = torch.get_rng_state()  # what a save records
        checkpoint.save(tmp_path, step, _state(step), keep_last=5)
    return checkpoint_root(tmp_path)


class _Boom:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(path) -> None:
    """What an attacker who can write the folder does too: make meta.json agree."""
    meta = json.loads((path / "meta.json").read_text())
    shard = path / "rank00000.pt"
    meta["files"]["rank00000.pt"] = {"sha256": checkpoint.sha256(shard),
                                     "bytes": shard.stat().st_size}
    (path / "meta.json").write_text(json.dumps(meta))


def test_round_trip_restores_state_and_rng(saved):
    torch.manual_seed(0)
    path = resolve_resume("auto", saved.parent)
    assert path.name == "step_00000002"
    state = checkpoint.load(path)  # restores the RNG state saved with the checkpoint
    assert state["step"] == 2
    assert torch.equal(state["engine"]["model"]["w"], torch.full((4096,), 2.0))
    assert torch.equal(torch.get_rng_state(), SAVED_RNG[2])


def test_crafted_pickle_is_refused_without_running_it(saved, tmp_path):
    marker = tmp_path / "pwned"
    newest = saved / "step_00000002"
    with (newest / "rank00000.pt").open("wb") as handle:
        pickle.dump({"engine": _Boom(str(marker))}, handle)
    # as is: the checksum no longer matches, so resume falls back to step 1
    assert resolve_resume("auto", tmp_path).name == "step_00000001"
    # with a matching checksum: verification passes, loading refuses, nothing runs
    _rehash(newest)
    with pytest.raises(CheckpointError, match="not loadable as plain tensors and data"):
        checkpoint.load(resolve_resume("auto", tmp_path))
    assert not marker.exists()


def test_flipped_block_is_detected_and_the_previous_checkpoint_used(saved, tmp_path, caplog):
    shard = saved / "step_00000002" / "rank00000.pt"
    data = bytearray(shard.read_bytes())
    data[1024:1024 + 4096] = bytes(b ^ 0xFF for b in data[1024:1024 + 4096])
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="omnidiff.checkpoint"):
        path = resolve_resume("auto", tmp_path)
    assert path.name == "step_00000001"
    assert checkpoint.load(path)["step"] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and "checksum" in warnings[0]
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        resolve_resume(str(saved / "step_00000002"), tmp_path)  # asked for by name: no fallback


def test_truncated_newest_falls_back(saved, tmp_path):
    shard = saved / "step_00000002" / "rank00000.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert resolve_resume("auto", tmp_path).name == "step_00000001"


@pytest.mark.parametrize("junk", ["step_abc", "step_00000009:{}", "step_00000008:not json",
                                  "step_00000007:[1, 2]", ".tmp_step_00000010", "notes.txt"])
def test_junk_beside_checkpoints_is_ignored(saved, tmp_path, junk):
    name, _, meta = junk.partition(":")
    target = saved / name
    if name.endswith(".txt"):
        target.write_text("hello")
    else:
        target.mkdir()
        if meta:
            (target / "meta.json").write_text(meta)
    assert resolve_resume("auto", tmp_path).name == "step_00000002"


def test_full_disk_fails_with_one_line_and_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    class Usage:
        free = 1024
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(CheckpointWriteError) as err:
        checkpoint.save(tmp_path, 3, _state(3), keep_last=5)
    message = str(err.value)
    assert "\n" not in message and "step 3" in message and str(saved) in message
    assert "MiB free" in message and "previous checkpoint is intact" in message
    assert sorted(p.name for p in saved.iterdir()) == ["step_00000001", "step_00000002"]
    assert err.value.exit_code == 3


def test_write_error_mid_save_removes_the_partial_files(saved, tmp_path, monkeypatch):
    def fail(state, handle):
        handle.write(b"x" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        checkpoint.save(tmp_path, 3, _state(3), keep_last=5)
    assert sorted(p.name for p in saved.iterdir()) == ["step_00000001", "step_00000002"]


def test_every_engine_state_loads_weights_only(single_process):
    """The states the engines and data streams write are plain tensors and data."""
    from omnidiff.parallel.engines import build_engine
    from omnidiff.platform.config import load_config
    from omnidiff.platform.objective import DiffusionObjective

    for overrides in (["parallel.zero_stage=0"], ["parallel.zero_stage=1"],
                      ["parallel.zero_stage=2", "parallel.precision=bf16"],
                      ["parallel.zero_stage=3"]):
        cfg = load_config(None, ["model.num_layers=1", "data.seq_length=64",
                                 "data.global_batch_size=1", *overrides])
        engine = build_engine(cfg, single_process, 512, DiffusionObjective(cfg.diffusion))
        buffer = io.BytesIO()
        torch.save(engine.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        engine.load_state_dict(state)  # and it restores
