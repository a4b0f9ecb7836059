"""Full (TP=1) state dicts <-> tensor-parallel shards, for checks, conversion and HF export.

How each megatron-core tensor is split over ``tp`` ranks (megatron-core 0.16.1, the layout its
CPU initialisation and its layers use; :func:`layout_of` is the one table, and a test checks it
against the ``partition_dim`` / ``partition_stride`` attributes megatron puts on parameters):

* ``embedding`` / ``output_layer``: vocabulary rows, contiguous (rank r holds rows
  [r V/tp, (r+1) V/tp)); the row count is the padded vocabulary (a multiple of 8 x TP), so
  changing TP may need :func:`split_state_dict`'s ``vocab_rows`` to pad.
* ``linear_qkv`` weight and bias: rows, contiguous. The fused rows are grouped per query group
  (``[q heads of g, k_g, v_g]``), so contiguous slices are whole groups.
* ``linear_fc1``: rows with stride 2. The TP=1 weight is ``[gate; up]``; rank r holds
  ``[gate_r; up_r]`` (a contiguous split would give rank 0 all of gate).
* ``linear_proj`` / ``linear_fc2`` (row-parallel): columns (dim 1), contiguous.
* norms and the speech projector: replicated. ``_extra_state`` entries (TE's FP8 metadata) are
  not weights: dropped.

Parameter names also differ between the two layer specs (TE fuses each pre-norm into the linear
that follows it): :func:`to_transformer_engine_names` / :func:`to_portable_names` move a
checkpoint between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from omnidiff import UserError
from omnidiff.parallel.collectives import all_gather

Tensor = torch.Tensor
VOCAB_KEYS = ("embedding.weight", "output_layer.weight")


@dataclass(frozen=True)
class Layout:
    """``dim`` None: replicated; else split along ``dim`` into ``tp x stride`` chunks, rank r
    taking chunks r, r + tp, ... (megatron's ``partition_stride``)."""

    dim: int | None
    stride: int = 1


REPLICATED = Layout(None)
_LAYOUTS: tuple[tuple[str, Layout], ...] = (
    ("embedding.weight", Layout(0)),
    ("output_layer.weight", Layout(0)),
    ("self_attention.linear_qkv.weight", Layout(0)),
    ("self_attention.linear_qkv.bias", Layout(0)),
    ("self_attention.linear_proj.weight", Layout(1)),
    ("mlp.linear_fc1.weight", Layout(0, stride=2)),
    ("mlp.linear_fc2.weight", Layout(1)),
    ("layernorm.weight", REPLICATED),  # input_/pre_mlp_/final_layernorm, TE's fused layer_norm_
)


class ReshardingError(UserError, ValueError):
    """A state dict that cannot be split or merged as asked."""


def is_weight(name: str, value: object) -> bool:
    return isinstance(value, Tensor) and not name.endswith("_extra_state")


def layout_of(name: str) -> Layout:
    if "speech_projector." in name:  # replicated over TP (continuous speech input)
        return REPLICATED
    for suffix, layout in _LAYOUTS:
        if name.endswith(suffix):
            return layout
    raise ReshardingError(f"no tensor-parallel layout known for {name!r}")


def shard(tensor: Tensor, layout: Layout, rank: int, tp: int) -> Tensor:
    """This rank's part of a full tensor."""
    if layout.dim is None or tp == 1:
        return tensor.clone()
    chunks = tp * layout.stride
    if tensor.shape[layout.dim] % chunks:
        raise ReshardingError(f"dim {layout.dim} of size {tensor.shape[layout.dim]} does not split "
                              f"into {tp} ranks x stride {layout.stride}")
    return torch.cat(tensor.chunk(chunks, dim=layout.dim)[rank::tp], dim=layout.dim)


def unshard(shards: Sequence[Tensor], layout: Layout) -> Tensor:
    """The full tensor from every rank's part (inverse of :func:`shard`)."""
    if layout.dim is None or len(shards) == 1:
        return shards[0].clone()
    parts = [s.chunk(layout.stride, dim=layout.dim) for s in shards]
    return torch.cat([p[j] for j in range(layout.stride) for p in parts], dim=layout.dim)


def split_state_dict(full: Mapping[str, Tensor], tp: int,
                     vocab_rows: int | None = None) -> list[dict[str, Tensor]]:
    """A TP=1 state dict -> one state dict per TP rank (weights only; load with strict=False).

    ``vocab_rows`` pads the embedding and output rows with zeros (e.g. to ``padded_size(tp)``).
    """
    weights = {k: v for k, v in full.items() if is_weight(k, v)}
    if vocab_rows is not None:
        weights = _resize_vocab(weights, vocab_rows)
    return [{k: shard(v, layout_of(k), r, tp) for k, v in weights.items()} for r in range(tp)]


def merge_state_dicts(shards: Sequence[Mapping[str, Tensor]],
                      vocab_rows: int | None = None) -> dict[str, Tensor]:
    """One state dict per TP rank -> the TP=1 state dict; ``vocab_rows`` trims padding rows."""
    names = [k for k, v in shards[0].items() if is_weight(k, v)]
    for rank, part in enumerate(shards[1:], start=1):
        if sorted(k for k, v in part.items() if is_weight(k, v)) != sorted(names):
            raise ReshardingError(f"TP rank {rank} holds different tensors than rank 0")
    full = {k: unshard([s[k] for s in shards], layout_of(k)) for k in names}
    return full if vocab_rows is None else _resize_vocab(full, vocab_rows)


def _resize_vocab(state: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    out = dict(state)
    for key in VOCAB_KEYS:
        if key not in out:
            continue
        have = out[key].shape[0]
        if rows < have:
            out[key] = out[key][:rows].clone()
        elif rows > have:
            pad = out[key].new_zeros(rows - have, *out[key].shape[1:])
            out[key] = torch.cat([out[key], pad])
    return out


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """The TP=1 weights of a live model, on every rank of its TP group (collective over TP,
    and over DP first for parameters ZeRO-3 partitions)."""
    with _zero3_gathered(module):
        return _gather_tp(module)


def _zero3_gathered(module: torch.nn.Module):
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def _gather_tp(module: torch.nn.Module) -> dict[str, Tensor]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    full = {}
    for name, value in module.state_dict().items():
        if not is_weight(name, value):
            continue
        layout = layout_of(name)
        if layout.dim is None or tp == 1:
            full[name] = value.detach().clone()
            continue
        # the weights' own device: where the run keeps its parameters
        parts = all_gather(value.detach(), group, value.device, what=f"gather {name}")
        full[name] = unshard(parts, layout)
    return full


# portable parameter name suffix -> TE spec name (the norm fused into the following linear)
TE_PARAMETER_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def _renamed(state: Mapping[str, Tensor],
             table: Mapping[str, str]) -> dict[str, Tensor]:
    """Suffix renames; ``_extra_state`` (TE's FP8 metadata, None in megatron's local linears)
    is dropped: it has no counterpart in the other spec, whose modules keep their own."""
    renamed = {}
    for name, value in state.items():
        if name.endswith("._extra_state"):
            continue
        for old_suffix, new_suffix in table.items():
            if name.endswith("." + old_suffix):
                name = name[: -len(old_suffix)] + new_suffix
        renamed[name] = value
    return renamed


def to_transformer_engine_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A portable-spec state dict under the TE spec's parameter names."""
    return _renamed(state, TE_PARAMETER_NAMES)


def to_portable_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A TE-spec state dict under the portable spec's parameter names."""
    return _renamed(state, {te: portable for portable, te in TE_PARAMETER_NAMES.items()})


def load_tp_shard(module: torch.nn.Module, full: Mapping[str, Tensor], names: Mapping[str, str],
                  rank: int, tp: int) -> None:
    """Load this TP rank's slices of ``full`` (TP=1 names) into ``module``; ``names`` maps each
    of the module's weight keys to its TP=1 name. Every weight must be given, with its shape."""
    own = module.state_dict()
    missing = sorted(name for key, name in names.items() if name not in full)
    if missing:
        raise ReshardingError(f"initial weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    shards = {key: shard(full[name], layout_of(name), rank, tp) for key, name in names.items()}
    wrong = [f"{key} {tuple(value.shape)} != {tuple(own[key].shape)}"
             for key, value in shards.items() if value.shape != own[key].shape]
    if wrong:
        raise ReshardingError(f"initial weights do not fit the model: {wrong[0]}")
    module.load_state_dict(shards, strict=False)
