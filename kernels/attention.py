"""Portable core attention for packed, bidirectional batches (the CPU spec's ``core_attention``).

megatron-core's local ``DotProductAttention`` needs CUDA and refuses packed sequences; this module
keeps its interface and runs ``torch.nn.functional.scaled_dot_product_attention``, on CPU and GPU.
Two input forms:

* packed THD (the fast path, what Transformer Engine fuses): ``[t, heads, d]`` tensors and a
  :class:`PackedSequences` (``cu_seqlens``): each packed sequence attends to itself only, fully
  bidirectionally, one unmasked SDPA call per sequence: no work and no memory is spent on the
  blocks between different samples;
* the reference: ``[s, b, heads, d]`` tensors and the dense block-diagonal boolean mask of
  :func:`block_diagonal_mask` (True = masked out), which the THD path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from omnidiff.kernels.rope import apply_rotary


@dataclass
class PackedSequences(PackedSeqParams):
    """megatron's ``PackedSeqParams`` plus what the portable packed path needs and Transformer
    Engine does not: the sequence lengths as Python ints (the per-sequence loop; taken from the
    host copy of ``cu_seqlens``, so the device is never read) and per-token RoPE angles
    ``[t, 1, d]`` when queries and keys are rotated here rather than by megatron."""

    lengths: tuple[int, ...] = ()
    rotary: torch.Tensor | None = None


def packed_sequences(cu_seqlens: torch.Tensor, max_seqlen: int, lengths: tuple[int, ...] = (),
                     rotary: torch.Tensor | None = None) -> PackedSequences:
    """THD parameters for bidirectional packed sequences (no padding between them)."""
    return PackedSequences(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, lengths=lengths,
                           rotary=rotary)


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` segment ids -> ``[b, 1, s, s]`` bool mask, True where attention is forbidden.

    Padding (segment 0) only sees padding, so its rows stay finite; real tokens never see it.
    """
    return (segment_ids[:, None, :, None] != segment_ids[:, None, None, :])


def reference_attention(query, key, value, mask, scale=None) -> torch.Tensor:
    """Plain softmax(QK^T)V on ``[b, heads, s, d]`` tensors (GQA by head repetition)."""
    repeat = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(repeat, dim=1)
    value = value.repeat_interleave(repeat, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value.float()).to(query.dtype)


class PackedSDPAttention(MegatronModule):
    """SDPA-backed drop-in for megatron's core attention, tensor-parallel by heads."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("PackedSDPAttention does not support context parallelism")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def _sdpa(self, q, k, v, mask=None) -> torch.Tensor:
        """SDPA on ``[b, heads, s, d]``."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedSDPAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        seq, batch, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = self._sdpa(q, k, v, None if attention_mask is None else ~attention_mask)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    def _packed(self, query, key, value, packed: PackedSequences) -> torch.Tensor:
        """``[t, heads, d]`` -> ``[t, heads * d]``, one SDPA per packed sequence."""
        if packed.qkv_format != "thd" or not packed.lengths:
            raise ValueError("PackedSDPAttention needs thd PackedSequences with host lengths")
        if packed.rotary is not None:
            query, key = apply_rotary(query, packed.rotary), apply_rotary(key, packed.rotary)
        lengths = packed.lengths
        pieces = [self._sdpa(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                  for q, k, v in zip(*(t.split(lengths) for t in (query, key, value)))]
        out = torch.cat(pieces)
        return out.reshape(out.shape[0], -1)
