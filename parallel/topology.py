"""Process topology: the TP x PP x DP layout (torchtitan's ``ParallelDims``) and its set-up.

Rank order is TP fastest, then DP, then PP: megatron-core's default ``tp-cp-ep-dp-pp`` order,
which DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model) mirrors; both are
derived here from the same :class:`ParallelDims` and :func:`rank_groups` checks they agree.
gloo on CPU, NCCL on GPU.

Seeding (:func:`seed`): every rank seeds the same generator before building the model. With
megatron's CPU initialisation each rank draws the *full* master weight and keeps its slice
(``fc1`` with stride 2, so rank r holds [gate_r; up_r]), hence TP shards equal slices of the
TP=1 model built from the same seed (see :mod:`omnidiff.parallel.resharding`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from omnidiff.parallel import cpu_compat
from omnidiff.parallel.launcher import free_port


class TopologyError(ValueError):
    """The requested parallel layout does not fit the world size."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.world_size % (self.tp * self.pp):
            raise TopologyError(
                f"world size {self.world_size} is not a multiple of tensor_parallel x "
                f"pipeline_parallel = {self.tp} x {self.pp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


MEGATRON_ORDER = "tp-cp-ep-dp-pp"
_LONE_ENV: dict[str, str] = {}  # launcher variables this process set for itself (world of one)
_DEEPSPEED_AXES = {"tp": "model", "dp": "data", "pp": "pipe"}


def deepspeed_topology(dims: ParallelDims):
    """DeepSpeed's topology for ``dims`` (for ``PipelineModule(topology=...)``)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)


def rank_groups(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """The TP/DP/PP process groups of megatron's layout; raises if DeepSpeed's would differ."""
    from megatron.core.parallel_state import RankGenerator

    generator = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=1,
                              order=MEGATRON_ORDER)
    topo = deepspeed_topology(dims)
    groups = {}
    for name, axis in _DEEPSPEED_AXES.items():
        megatron = sorted(generator.get_ranks(name))
        if megatron != sorted(topo.get_axis_comm_lists(axis)):
            raise TopologyError(f"megatron and DeepSpeed disagree on the {name} groups for {dims}")
        groups[name] = megatron
    return groups


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
    from megatron.core import parallel_state

    init_process_group(backend)
    dims = ParallelDims(dist.get_world_size(), tp, pp)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, order=MEGATRON_ORDER
    )
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
