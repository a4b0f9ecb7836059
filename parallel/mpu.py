"""megatron-core's ``parallel_state`` as the ``mpu`` object DeepSpeed expects.

DeepSpeed partitions ZeRO state over ``get_data_parallel_group()`` and computes the gradient
norm as: every parameter tagged ``tensor_model_parallel`` (megatron's attribute) counts on every
rank, every other (replicated) parameter only where ``get_model_parallel_rank() == 0``, then a
sum over ``get_model_parallel_group()``. ``parallel_state`` lacks some of these names
(REFERENCE §7), so this adapter supplies them with Megatron-DeepSpeed's meaning:

* model-parallel *group* = the tensor x pipeline group (one copy of every parameter);
* model-parallel *rank* = the tensor-parallel rank, so replicated parameters (norms) count once
  per pipeline stage, never once per TP rank.

Only the methods below exist on purpose: DeepSpeed switches behaviour on ``hasattr`` (for
example ``get_sequence_parallel_world_size`` would turn on its Ulysses data layout).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Stateless view of the groups created by :func:`omnidiff.parallel.topology.initialize`."""

    # --- tensor parallel ----------------------------------------------------------------------
    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # --- pipeline parallel --------------------------------------------------------------------
    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    # --- data parallel ------------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    # --- model parallel (tensor x pipeline) ---------------------------------------------------
    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        """The TP rank: where replicated parameters are counted in the gradient norm."""
        return ps.get_tensor_model_parallel_rank()
