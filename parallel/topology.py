"""Process topology: the TP x PP x DP layout (torchtitan's ``ParallelDims``) and its set-up.

Rank order is TP fastest, then DP, then PP: megatron-core's default ``tp-cp-ep-dp-pp`` order,
which the DeepSpeed topology mirrors. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

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


def init_process_group(backend: str | None = None, timeout_s: int = 600) -> None:
    """Join (or, for a lone process, create) the default process group.

    Without launcher variables this becomes a world of one, so single-process runs and tests use
    the same megatron-core code path as distributed ones.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
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
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    return dims


def destroy() -> None:
    """Tear down megatron-core groups and the process group (tests and clean exits)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
