"""``ParallelDims`` (torchtitan's idea): the one object that knows the TP x PP x DP layout.

Sizes, this rank's coordinates, its process groups, and every layout check live here, each
check once. Rank order is TP fastest, then DP, then PP: megatron-core's default
``tp-cp-ep-dp-pp`` order, which DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model) mirrors; :func:`rank_groups` checks the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from omnidiff import ConfigError
from omnidiff.data.config import DataConfig
from omnidiff.parallel.collectives import all_reduce
from omnidiff.parallel.config import ModelConfig, ParallelConfig

MEGATRON_ORDER = "tp-cp-ep-dp-pp"
_DEEPSPEED_AXES = {"tp": "model", "dp": "data", "pp": "pipe"}


def check_layout(model: ModelConfig, parallel: ParallelConfig, data: DataConfig) -> None:
    """Every layout check that needs no world size; raises :class:`ConfigError` naming keys."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_parallel > 1")
    for key, value in (("num_attention_heads", model.num_attention_heads),
                       ("num_query_groups", model.num_query_groups)):
        if value % tp:
            raise ConfigError(f"parallel.tensor_parallel ({tp}) must divide model.{key} ({value})")
    if model.num_layers % pp:
        raise ConfigError(f"parallel.pipeline_parallel ({pp}) must divide model.num_layers "
                          f"({model.num_layers})")
    if parallel.sequence_parallel and data.seq_length % tp:
        raise ConfigError(f"parallel.tensor_parallel ({tp}) must divide data.seq_length "
                          f"({data.seq_length}) under sequence_parallel")
    if parallel.zero_stage > 1 and pp > 1:
        raise ConfigError(f"parallel.zero_stage {parallel.zero_stage} does not compose with "
                          "pipeline_parallel > 1 (ZeRO-2/3 partition gradients); use 0 or 1")
    if parallel.zero_stage == 0 and parallel.precision != "fp32" and tp > 1:
        # DeepSpeed's stage-0 bf16/fp16 optimizer (FP16_UnfusedOptimizer) filters its norm on
        # the gradients' tensor_model_parallel attribute, which only parameters carry: every
        # TP rank but 0 would drop its shards from the clipping norm.
        raise ConfigError(f"parallel.precision {parallel.precision} with tensor_parallel > 1 "
                          "needs zero_stage >= 1 (DeepSpeed's stage-0 low-precision optimizer "
                          "miscounts the gradient norm under tensor parallelism)")
    micro_batches_per_rank(data.global_batch_size, data.micro_batch_size, 1)


def micro_batches_per_rank(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches each data-parallel rank accumulates per optimizer step."""
    per_pass = micro_batch * dp
    if global_batch % per_pass:
        raise ConfigError(f"data.global_batch_size ({global_batch}) must be a multiple of "
                          f"data.micro_batch_size x data-parallel size ({micro_batch} x {dp})")
    return global_batch // per_pass


@dataclass
class ParallelDims:
    """Sizes and this rank's place in them; ``groups`` are filled by ``topology.initialize``."""

    world_size: int
    tp: int = 1
    pp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {self.world_size} is not a multiple of parallel.tensor_parallel x "
                f"parallel.pipeline_parallel = {self.tp} x {self.pp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    # --- this rank's coordinates (TP fastest, then DP, then PP) -------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- process groups (after topology.initialize) -------------------------------------------
    def group(self, name: str):
        """The ``tp`` / ``dp`` / ``pp`` / ``mp`` (TP x PP) process group of this rank."""
        if name not in self.groups:
            raise RuntimeError(f"no {name!r} process group: call topology.initialize first")
        return self.groups[name]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (one small all-reduce)."""
        if self.world_size == 1 or not dist.is_initialized():
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        all_reduce(value, None, self.device, dist.ReduceOp.MAX, "stop request")
        return bool(value.item())

    # --- checks that need the world size -------------------------------------------------------
    def check_config(self, parallel: ParallelConfig) -> None:
        """The process groups must be the ones the config asks for."""
        if (self.tp, self.pp) != (parallel.tensor_parallel, parallel.pipeline_parallel):
            raise ConfigError(
                f"the process groups are tensor_parallel={self.tp} x pipeline_parallel={self.pp}; "
                f"the config asks for tensor_parallel={parallel.tensor_parallel} x "
                f"pipeline_parallel={parallel.pipeline_parallel}: call topology.initialize with "
                "those sizes first")

    def micro_batches(self, data: DataConfig) -> int:
        """Micro-batches this rank runs per optimizer step (gradient accumulation)."""
        return micro_batches_per_rank(data.global_batch_size, data.micro_batch_size, self.dp)


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
            raise ConfigError(f"megatron and DeepSpeed disagree on the {name} groups for {dims}")
        groups[name] = megatron
    return groups
