"""Atomic, per-rank sharded checkpoints with ``--resume auto`` and keep-last pruning.

Layout::

    <output_dir>/checkpoints/step_00000100/
        rank00000.pt ... rankNNNNN.pt   each rank's engine + data + RNG state
        meta.json                        written last: its presence marks the checkpoint complete

A save first writes into ``.tmp_step_*`` and is renamed into place only after every rank has
written and ``meta.json`` exists, so a crash mid-save leaves the previous checkpoint as the newest
complete one. Only rank 0 renames and prunes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import get_cuda_rng_tracker

META = "meta.json"
PREFIX = "step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Every generator a step may draw from, megatron's per-TP-rank tracker states included."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized():
        state["tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        get_cuda_rng_tracker().set_states(state["tracker"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``none`` -> None, ``auto`` -> newest complete checkpoint (or None), else that path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {META}): {path}")
    return path


def write_shard(path: Path, state: dict) -> None:
    """One rank's shard, written whole or not at all."""
    torch.save(state, path.with_suffix(".part"))
    os.replace(path.with_suffix(".part"), path)


def save(output_dir: str | Path, step: int, state: dict, keep_last: int,
         meta: dict | None = None) -> Path:
    """Collectively save this rank's ``state``; returns the final checkpoint directory."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write_shard(tmp / f"rank{_rank():05d}.pt", {**state, "rng": rng_state()})
    _barrier()
    if _rank() == 0:
        info = {"step": step, "world_size": _world(), "time": time.time(), **(meta or {})}
        (tmp / META).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path) -> dict:
    """This rank's state from a checkpoint (RNG state restored as a side effect)."""
    meta = json.loads((path / META).read_text())
    if meta["world_size"] != _world():
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} processes; this run has "
            f"{_world()} (resharding is done by `omnidiff export`, not on resume)"
        )
    state = torch.load(path / f"rank{_rank():05d}.pt", map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
