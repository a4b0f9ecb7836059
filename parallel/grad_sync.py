"""Sequence-parallel gradient all-reduce over the TP group (DeepSpeed does not do it).

Under sequence parallelism each TP rank runs the norms on its own slice of the sequence, so the
gradient of a replicated norm weight is only that slice's share. megatron's own DDP sums such
gradients (``sequence_parallel`` attribute) over TP; DeepSpeed only averages over DP. A tensor
hook here sums them over TP as each gradient is produced, i.e. before it is accumulated into
``.grad`` and before any DeepSpeed hook (ZeRO reduce, stage-0 all-reduce) sees it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from omnidiff.parallel.collectives import all_reduce


def sequence_parallel_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


def register_sequence_parallel_grad_sync(module: torch.nn.Module, tp_group: ProcessGroup,
                                         device: torch.device) -> list[RemovableHandle]:
    """Sum the gradients of ``sequence_parallel`` parameters over ``tp_group``; returns handles."""
    if dist.get_world_size(tp_group) == 1:
        return []

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()  # autograd may share the incoming buffer with other consumers
        return all_reduce(grad, tp_group, device, what="sequence-parallel gradient sum")

    return [p.register_hook(summed) for p in sequence_parallel_params(module)]
