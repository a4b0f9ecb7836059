"""The full (TP = 1) weights of a ZeRO-3 checkpoint, rebuilt from DeepSpeed's fp32 partitions.

Under ZeRO-3 a rank's module holds placeholders only, so its shard has no model state
(``engine.model`` is None); the weights are the optimizer's fp32 partitions,
``engine.optimizer.fp32_flat_groups``: one flat tensor per (sub-)group per DP rank. Their layout
(DeepSpeed 0.19.8, ``runtime/zero/stage3.py`` and ``utils/zero_to_fp32.py``): parameters in the
optimizer's order - :func:`omnidiff.parallel.optim.parameter_groups` of the module, as the engine
builds it (decay group, then no-decay, module order inside each; DeepSpeed never reorders) - and
each parameter gives every DP rank ``ceil(numel / dp)`` consecutive values (the last rank's
share zero-padded). A rank's groups concatenated are therefore one walk over the parameters;
the DP ranks' slices of a parameter, concatenated and cut to ``numel``, are that parameter of
this TP rank, and the TP ranks merge as everywhere else
(:func:`omnidiff.parallel.resharding.merge_state_dicts`).

The parameter order comes from the module itself, built on the meta device (megatron-core needs
its process groups for that: a world of one is made for the purpose when there is none).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from omnidiff import UserError
from omnidiff.data.tokens.text import build_vocab
from omnidiff.parallel import topology
from omnidiff.parallel.config import ParallelConfig
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.model import build_model
from omnidiff.parallel.optim import parameter_groups
from omnidiff.parallel.resharding import layout_of, merge_state_dicts, shard, to_portable_names
from omnidiff.platform import checkpoint
from omnidiff.platform.config import RunConfig, build_config
from omnidiff.platform.hf_convert import megatron_shapes

Tensor = torch.Tensor
FLAT_GROUPS = "fp32_flat_groups"  # DeepSpeed's key for the fp32 partitions in its state dict


class ZeroPartitionError(UserError):
    """A ZeRO-3 checkpoint whose partitions do not make the model of its own run config."""


def zero3_full_weights(checkpoint_dir: str | Path) -> dict[str, Tensor]:
    """The full TP = 1 megatron-named weights of a ZeRO-3 checkpoint (names as the trained
    module has them)."""
    path = Path(checkpoint_dir)
    meta = checkpoint.read_meta(path)
    if not isinstance(meta.get("config"), dict):
        raise ZeroPartitionError(f"{path / checkpoint.META}: no run config ('config')")
    cfg = build_config(meta["config"])
    world, tp = meta["world_size"], cfg.parallel.tensor_parallel
    rows = build_vocab(cfg.data)[0].padded_size(tp)
    order = parameter_order(cfg, rows)
    partitions: dict[int, dict[int, Tensor]] = defaultdict(dict)
    for rank in range(world):
        dims = ParallelDims(world, tp, cfg.parallel.pipeline_parallel, rank=rank)
        partitions[dims.tp_rank][dims.dp_rank] = _flat_partition(path, rank, world)
    full_shapes = megatron_shapes(cfg.model, rows, cfg.data.heard_feature_size)
    shards = []
    for tp_rank in range(tp):
        shapes = {name: _tp_shape(name, full_shapes, tp_rank, tp) for name in order}
        ranks = partitions[tp_rank]
        shards.append(unflatten([ranks[d] for d in sorted(ranks)], shapes, f"{path} TP {tp_rank}"))
    return merge_state_dicts(shards)


def unflatten(flats: list[Tensor], shapes: dict[str, torch.Size], where: str) -> dict[str, Tensor]:
    """One TP rank's parameters from its DP ranks' concatenated fp32 partitions (DP order);
    ``shapes`` in the optimizer's parameter order."""
    dp = len(flats)
    need = sum(math.ceil(math.prod(shape) / dp) for shape in shapes.values())
    if any(len(flat) != need for flat in flats):
        raise ZeroPartitionError(f"{where}: the ZeRO-3 partitions hold {[len(f) for f in flats]} "
                                 f"values per DP rank; the run config's model needs {need}")
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / dp)
        pieces = torch.cat([flat[offset:offset + part] for flat in flats])
        out[name] = pieces[:numel].view(shape).clone()
        offset += part
    return out


def parameter_order(cfg: RunConfig, vocab_rows: int) -> list[str]:
    """Parameter names in the order the engine hands them to the optimizer (and so ZeRO)."""
    parallel = ParallelConfig(transformer_engine=cfg.parallel.transformer_engine)
    with _megatron_groups(), torch.device("meta"):
        model = build_model(cfg.model, parallel, vocab_rows, perform_initialization=False)
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(p)] for group in parameter_groups(model, 0.0) for p in group["params"]]


@contextlib.contextmanager
def _megatron_groups() -> Iterator[None]:
    """megatron-core's groups: the live ones, else a world of one for the duration."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("a process group without megatron-core groups: call "
                           "omnidiff.parallel.topology.initialize first")
    topology.initialize(1)
    try:
        yield
    finally:
        topology.destroy()


def _tp_shape(name: str, full_shapes: dict[str, tuple[int, ...]], tp_rank: int,
              tp: int) -> torch.Size:
    """The shape of TP rank ``tp_rank``'s part of a parameter (TE names read as portable)."""
    portable = next(iter(to_portable_names({name: None})))
    if portable not in full_shapes:
        raise ZeroPartitionError(f"parameter {name!r} is not in the model's shape table")
    full = torch.empty(full_shapes[portable], device="meta")
    return shard(full, layout_of(portable), tp_rank, tp).shape


def _flat_partition(path: Path, rank: int, world: int) -> Tensor:
    """One rank's fp32 partitions, concatenated over its (sub-)groups."""
    checkpoint.verify(path, rank=rank, world=world)
    file = path / checkpoint.shard_name(rank)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unpickling failure: not a plain-tensor shard
        raise ZeroPartitionError(f"{file}: not loadable as plain tensors") from None
    optimizer = (state.get("engine") or {}).get("optimizer") if isinstance(state, dict) else None
    groups = optimizer.get(FLAT_GROUPS) if isinstance(optimizer, dict) else None
    if not groups:
        raise ZeroPartitionError(f"{file}: no ZeRO-3 fp32 partitions ({FLAT_GROUPS})")
    return torch.cat([group.float().reshape(-1) for group in groups])
