"""Atomic, verified, per-rank sharded checkpoints with ``--resume auto`` and keep-last pruning.

Layout::

    <output_dir>/checkpoints/step_00000100/
        rank00000.pt ... rankNNNNN.pt   each rank's engine + data + RNG state (tensors, plain data)
        meta.json                        written last: step, world size, SHA-256 of every shard

A save first writes into ``.tmp_step_*`` and is renamed into place only after every rank has
written and ``meta.json`` exists, so a crash mid-save leaves the previous checkpoint as the newest
complete one. Only rank 0 renames and prunes. A save that fails (disk full, read-only volume)
removes its partial files on every rank and stops the run with one line naming the path.

Loading never runs code: shards are read with ``torch.load(weights_only=True)`` after their
hash matched ``meta.json``. ``--resume auto`` takes the newest checkpoint that verifies on every
rank and warns once about each newer one it skips; folders that are not checkpoints are ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from omnidiff import RunStopped, UserError
from omnidiff.platform.rng import restore_rng_state, rng_state

log = logging.getLogger("omnidiff.checkpoint")
META = "meta.json"
PREFIX = "step_"
FORMAT = 2  # 1: pickled shards without hashes (refused)
_STEP_DIR = re.compile(rf"^{PREFIX}(\d+)$")
_SPACE_MARGIN = 1.1  # free space wanted, relative to the bytes about to be written


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, from another layout)."""


class CheckpointWriteError(RunStopped):
    """A save failed; the previous checkpoint is intact."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a world of one: just ours)."""
    if not dist.is_initialized() or _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def state_bytes(state: Any) -> int:
    """Tensor bytes in a nested state (what a save is about to write, roughly)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def write_shard(path: Path, state: dict) -> dict[str, Any]:
    """One rank's shard, written whole or not at all; returns its size and hash."""
    needed = int(state_bytes(state) * _SPACE_MARGIN)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise OSError(28, f"needs ~{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free")
    part = path.with_suffix(".part")
    with part.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def save(output_dir: str | Path, step: int, state: dict, keep_last: int,
         meta: dict | None = None) -> Path:
    """Collectively save this rank's ``state``; returns the final checkpoint directory."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}"
    problem = None
    if _rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            problem = f"cannot create {tmp}: {err.strerror or err}"
    problem = next((p for p in _gather(problem) if p), None)
    info = None
    if problem is None:
        shard = tmp / shard_name(_rank())
        try:
            info = write_shard(shard, {**state, "rng": rng_state()})
        except OSError as err:
            shard.with_suffix(".part").unlink(missing_ok=True)
            shard.unlink(missing_ok=True)
            problem = f"cannot write {shard}: {err.strerror or err}"
    results = _gather((info, problem))
    problem = next((p for _, p in results if p), None)
    if problem is None and _rank() == 0:
        try:
            files = {shard_name(r): info for r, (info, _) in enumerate(results)}
            document = {"format": FORMAT, "step": step, "world_size": _world(),
                        "time": time.time(), "files": files, **(meta or {})}
            (tmp / META).write_text(json.dumps(document, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:
            problem = f"cannot finish {final}: {err.strerror or err}"
    problem = next((p for p in _gather(problem) if p), None)
    if problem is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"checkpoint of step {step} failed, {problem}; "
                                   "the previous checkpoint is intact")
    if _rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


# --- finding and verifying ------------------------------------------------------------------
def read_meta(path: Path) -> dict:
    """``meta.json`` of a checkpoint folder, checked for the keys a resume needs."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / META}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META}: not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: written by an older omnidiff (format "
                              f"{meta.get('format', 1)}, shards without checksums); not loaded")
    for key, kind in (("step", int), ("world_size", int), ("files", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path / META}: missing or invalid {key!r}")
    return meta


def complete_checkpoints(root: Path) -> list[Path]:
    """Folders that look like complete checkpoints (``step_<n>`` with a meta file), oldest
    first; anything else in ``root`` is ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def verify(path: Path, rank: int | None = None, world: int | None = None) -> dict:
    """``meta.json`` if ``path`` is a usable checkpoint for this rank; raises why not."""
    rank = _rank() if rank is None else rank
    world = _world() if world is None else world
    meta = read_meta(path)
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} processes; this run has {world} "
            "(export it and start from the export to change the layout)")
    name = shard_name(rank)
    expected = meta["files"].get(name)
    shard = path / name
    if not isinstance(expected, dict) or not shard.is_file():
        raise CheckpointError(f"{shard}: missing")
    if shard.stat().st_size != expected.get("bytes") or sha256(shard) != expected.get("sha256"):
        raise CheckpointError(f"{shard}: contents do not match the checksum in {META} "
                              "(corrupt or modified)")
    return meta


def _agreed(path: Path) -> str | None:
    """None when ``path`` verifies on every rank, else the first rank's reason."""
    try:
        verify(path)
        reason = None
    except CheckpointError as err:
        reason = str(err)
    return next((r for r in _gather(reason) if r), None)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest checkpoint that verifies on every rank (or
    None); else that path, which must verify."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        reason = _agreed(path) if (path / META).is_file() else f"{path}: no {META} (not a checkpoint)"
        if reason:
            raise CheckpointError(f"checkpoint.resume: {reason}")
        return path
    for path in reversed(complete_checkpoints(checkpoint_root(output_dir))):
        reason = _agreed(path)
        if reason is None:
            return path
        if _rank() == 0:
            log.warning("skipping checkpoint %s: %s", path.name, reason)
    return None


def load(path: Path) -> dict:
    """This rank's state from a verified checkpoint (RNG state restored as a side effect).

    Only tensors and plain data load (``weights_only``): a shard that would need to run code
    is refused, never executed.
    """
    shard = path / shard_name(_rank())
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad shard
        raise CheckpointError(f"{shard}: not loadable as plain tensors and data "
                              f"({type(err).__name__}); refused") from None
    restore_rng_state(state.pop("rng"))
    return state
