"""DeepSpeed optimizer state in and out of checkpoints, as plain data.

Checkpoints load with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only. DeepSpeed's optimizer ``state_dict`` holds three objects besides: the loss
scaler (kept as its attributes, restored onto the live scaler), the ZeRO stage enum (kept as its
number) and the parameter fragment map, which only DeepSpeed's universal checkpoints read
(dropped).
"""

from __future__ import annotations

import copy
from typing import Any

import torch.distributed as dist

from omnidiff.parallel.dims import ParallelDims

_SCALER = "loss_scaler"
_STAGE = "zero_stage"
_FRAGMENTS = "param_slice_mappings"


def plain_optimizer_state(optimizer) -> dict[str, Any]:
    state = dict(optimizer.state_dict())
    state.pop(_FRAGMENTS, None)
    if _SCALER in state and not isinstance(state[_SCALER], dict):
        state[_SCALER] = dict(vars(state[_SCALER]))
    if _STAGE in state:
        state[_STAGE] = int(state[_STAGE])
    return state


def _live_state(state: dict[str, Any], optimizer) -> dict[str, Any]:
    """The objects :func:`plain_optimizer_state` turned into data, made objects again."""
    state = dict(state)
    saved = state.get(_SCALER)
    if isinstance(saved, dict) and hasattr(optimizer, _SCALER):
        scaler = copy.copy(getattr(optimizer, _SCALER))
        vars(scaler).update(saved)
        state[_SCALER] = scaler
    if _STAGE in state:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        state[_STAGE] = ZeroStageEnum(state[_STAGE])
    return state


def load_optimizer_state(ds_engine, state: dict[str, Any], dims: ParallelDims) -> None:
    """Restore this rank's optimizer state into a DeepSpeed engine.

    ZeRO reads entry [dp_rank] of a per-DP-rank list; this rank saved its own, fp32 master
    partition included (all the weights under ZeRO-3). Without ZeRO the state is the torch
    optimizer's, or DeepSpeed's stage-0 bf16/fp16 one (fp32 masters inside).
    """
    optimizer = ds_engine.optimizer
    state = _live_state(state, optimizer)
    if not ds_engine.zero_optimization():
        optimizer.load_state_dict(state)
        return
    partitions: list[Any] = [None] * dims.dp
    partitions[dist.get_rank(dims.group("dp"))] = state
    optimizer.load_state_dict(partitions, load_optimizer_states=True,
                              load_from_fp32_weights=True)
