"""The run's :class:`~omnidiff.parallel.dims.ParallelDims` as the ``mpu`` object DeepSpeed expects.

DeepSpeed partitions ZeRO state over ``get_data_parallel_group()`` and computes the gradient
norm as: every parameter tagged ``tensor_model_parallel`` (megatron's attribute) counts on every
rank, every other (replicated) parameter only where ``get_model_parallel_rank() == 0``, then a
sum over ``get_model_parallel_group()``. Megatron-DeepSpeed's meaning of these names is kept:

* model-parallel *group* = the tensor x pipeline group (one copy of every parameter);
* model-parallel *rank* = the tensor-parallel rank, so replicated parameters (norms) count once
  per pipeline stage, never once per TP rank.

Only the methods below exist on purpose: DeepSpeed switches behaviour on ``hasattr`` (for
example ``get_sequence_parallel_world_size`` would turn on its Ulysses data layout).
"""

from __future__ import annotations

import torch.distributed as dist

from omnidiff.parallel.dims import ParallelDims


class MegatronMPU:
    """A view of ``dims`` under DeepSpeed's method names."""

    def __init__(self, dims: ParallelDims) -> None:
        self.dims = dims

    # --- tensor parallel ----------------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_group(self):
        return self.dims.group("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.rank - self.dims.tp_rank

    # --- pipeline parallel --------------------------------------------------------------------
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipeline_model_parallel_group(self):
        return self.dims.group("pp")

    # --- data parallel ------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_data_parallel_group(self):
        return self.dims.group("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dims.group("dp"))

    # --- model parallel (tensor x pipeline) ---------------------------------------------------
    def get_model_parallel_group(self):
        return self.dims.group("mp")

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_model_parallel_rank(self) -> int:
        """The TP rank: where replicated parameters are counted in the gradient norm."""
        return self.dims.tp_rank
