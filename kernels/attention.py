"""Portable core attention for packed, bidirectional batches (the CPU spec's ``core_attention``).

megatron-core's local ``DotProductAttention`` needs CUDA; this module keeps its interface
(``[s, b, heads, d]`` in, ``[s, b, heads * d]`` out, megatron's boolean mask where True means
"masked out") and runs ``torch.nn.functional.scaled_dot_product_attention``, which works on CPU
and GPU. The mask comes from :func:`block_diagonal_mask`: each packed sample attends only to
itself, fully bidirectionally, and never to the padding tail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("PackedSDPAttention takes packing through attention_mask only")
        seq, batch, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
