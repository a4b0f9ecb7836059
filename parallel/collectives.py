"""The platform's own tensor collectives, each checked against the device its run is on.

NCCL only moves CUDA tensors and gloo only CPU ones, so a tensor made on the wrong device (a loss
value built with ``torch.tensor(...)``, say) fails only on the cluster. Every collective of
``parallel/`` and ``platform/`` goes through here with the device the run's ``ParallelDims``
declares, and a wrong tensor fails on any machine with a line naming the group; a test keeps
raw ``torch.distributed`` collectives out of the package. (``kernels/`` reduce tensors made
from their inputs, on the inputs' device, and megatron / DeepSpeed handle their own.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor on another device than its process group uses."""


def check_device(tensor: torch.Tensor, device: torch.device, what: str) -> None:
    expected = torch.device(device)
    same = tensor.device.type == expected.type and (
        expected.index is None or tensor.device.index in (None, expected.index))
    if not same:
        raise CollectiveDeviceError(f"{what}: tensor on {tensor.device}, but the run's "
                                    f"collectives use {expected}")


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None, device: torch.device,
               op=dist.ReduceOp.SUM, what: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce over ``group`` (a no-op for a group of one, after the check)."""
    check_device(tensor, device, what)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: ProcessGroup | None, device: torch.device,
               what: str = "all_gather") -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in group rank order."""
    check_device(tensor, device, what)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def broadcast(tensor: torch.Tensor, source: int, group: ProcessGroup | None,
              device: torch.device, what: str = "broadcast") -> torch.Tensor:
    """In place: global rank ``source``'s ``tensor`` on every rank of ``group``."""
    check_device(tensor, device, what)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=source, group=group)
    return tensor
