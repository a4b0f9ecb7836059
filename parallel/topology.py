"""Process set-up: the default process group, megatron-core's TP/PP/DP groups, seeding.

:func:`initialize` returns the run's :class:`~omnidiff.parallel.dims.ParallelDims` with its
process groups; everything downstream asks that object, not megatron's globals, for ranks and
groups. gloo on CPU, NCCL on GPU.

Seeding (:func:`seed`): every rank seeds the same generator before building the model. With
megatron's CPU initialisation each rank draws the *full* master weight and keeps its slice
(``fc1`` with stride 2, so rank r holds [gate_r; up_r]), hence TP shards equal slices of the
TP=1 model built from the same seed (see :mod:`omnidiff.parallel.resharding`).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from omnidiff.parallel import cpu_compat
from omnidiff.parallel.dims import MEGATRON_ORDER, ParallelDims
from omnidiff.parallel.launcher import free_port

_LONE_ENV: dict[str, str] = {}  # launcher variables this process set for itself (world of one)


def init_process_group(backend: str | None = None, timeout_s: int = 600) -> None:
    """Join (or, for a lone process, create) the default process group.

    Without launcher variables this becomes a world of one, so single-process runs and tests use
    the same megatron-core code path as distributed ones.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        lone = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        os.environ.update(lone)
        _LONE_ENV.update(lone)  # removed again by destroy(): child processes must not inherit
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cpu_compat.enable()  # megatron's sequence-parallel collectives, on a CPU-only machine
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def initialize(tp: int = 1, pp: int = 1, backend: str | None = None) -> ParallelDims:
    """Create the process group and megatron-core's TP/PP/DP groups; return the layout."""
    from megatron.core import parallel_state as ps

    init_process_group(backend)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    dims = ParallelDims(dist.get_world_size(), tp, pp, rank=dist.get_rank(), device=device)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # No gloo side groups: only megatron's distributed optimizer uses them, and on multi-node
    # runs they need a routable interface (GLOO_SOCKET_IFNAME) for nothing.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 order=MEGATRON_ORDER, create_gloo_process_groups=False)
    coordinates = (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                   ps.get_pipeline_model_parallel_rank())
    if coordinates != (dims.tp_rank, dims.dp_rank, dims.pp_rank):
        raise RuntimeError(f"megatron placed rank {dims.rank} at (tp, dp, pp) = {coordinates}, "
                           f"ParallelDims at {(dims.tp_rank, dims.dp_rank, dims.pp_rank)}")
    dims.groups.update(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
                       pp=ps.get_pipeline_model_parallel_group(),
                       mp=ps.get_model_parallel_group())
    return dims


def seed(seed: int) -> None:
    """Seed this rank (after :func:`initialize`, before building the model).

    The default generator gets the same seed on every rank: megatron's CPU initialisation draws
    every full weight and keeps this rank's slice, so TP shards are slices of the TP=1 model.
    megatron's tracker gets its per-TP-rank states (dropout inside TP regions differs per
    rank, as in megatron), on CPU generator states when there is no GPU.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    cpu_compat.install_rng_tracker()
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core groups and the process group (tests and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in _LONE_ENV:
        os.environ.pop(key, None)
    _LONE_ENV.clear()
