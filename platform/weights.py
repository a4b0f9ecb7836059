"""The full (TP = 1) weights of a platform checkpoint, whatever layout it was trained on.

A checkpoint holds one shard per rank (:mod:`omnidiff.platform.checkpoint`). Data-parallel
replicas hold the same weights, so only DP rank 0's shards are read; pipeline stages already save
their layers under PP = 1 names, so stages are unions; TP shards are merged by
:func:`omnidiff.parallel.resharding.merge_state_dicts`. Which rank is which comes from
:class:`~omnidiff.parallel.dims.ParallelDims`, the one place that knows the rank order. Under
ZeRO-3 the modules hold no weights; they are rebuilt from the optimizer's partitions
(:mod:`omnidiff.platform.zero3_weights`). Names are as the trained module has them (the TE spec
fuses norm names: :func:`omnidiff.parallel.resharding.to_portable_names` maps them).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from omnidiff import UserError
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.resharding import merge_state_dicts
from omnidiff.platform import checkpoint
from omnidiff.platform.config import build_config
from omnidiff.platform.zero3_weights import zero3_full_weights

Tensor = torch.Tensor


class WeightsError(UserError):
    """A checkpoint whose weights cannot be read (missing, old format, unsupported layout)."""


def full_weights(checkpoint_dir: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(resolved raw run config, full TP = 1 megatron-named state dict)`` of a checkpoint."""
    path = Path(checkpoint_dir)
    if not (path / checkpoint.META).is_file():
        raise WeightsError(f"{path}: not a checkpoint (no {checkpoint.META})")
    meta = checkpoint.read_meta(path)
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise WeightsError(f"{path / checkpoint.META}: no run config ('config')")
    parallel = build_config(raw).parallel
    if parallel.zero_stage == 3:
        return raw, zero3_full_weights(path)
    world = meta["world_size"]
    stages: dict[int, dict[int, dict[str, Tensor]]] = defaultdict(dict)
    for rank in range(world):
        dims = ParallelDims(world, parallel.tensor_parallel, parallel.pipeline_parallel, rank=rank)
        if dims.dp_rank == 0:
            stages[dims.pp_rank][dims.tp_rank] = _model_state(path, rank, world)
    full: dict[str, Tensor] = {}
    for stage in sorted(stages):
        shards = stages[stage]
        full.update(merge_state_dicts([shards[tp] for tp in sorted(shards)]))
    return raw, full


def _model_state(path: Path, rank: int, world: int) -> dict[str, Tensor]:
    """The model weights in one rank's shard, read without running pickled code."""
    checkpoint.verify(path, rank=rank, world=world)
    shard = path / checkpoint.shard_name(rank)
    try:
        state = torch.load(shard, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling failure means a pre-safe shard
        raise WeightsError(f"{shard}: not loadable as plain tensors; the checkpoint predates "
                           "safe checkpoints (re-train or re-save it with this omnidiff)") from None
    engine = state.get("engine") if isinstance(state, dict) else None
    if not isinstance(engine, dict) or "model" not in engine:
        raise WeightsError(f"{shard}: no engine model state")
    if not isinstance(engine["model"], dict):
        raise WeightsError(f"{shard}: no model weights (engine.model is "
                           f"{type(engine['model']).__name__}) in a run without ZeRO-3")
    return engine["model"]
