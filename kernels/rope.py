"""Rotary position embedding for packed rows (megatron's ``RotaryEmbedding.forward`` needs CUDA).

Angles are computed per token from its own position id, so positions restart per packed sample.
The layout matches megatron's ``apply_rotary_pos_emb`` (rotate-half, angles duplicated over the
two halves of the head dimension), which is also Qwen2's; :func:`apply_rotary` is megatron's
formula, for attention that rotates queries and keys itself (the portable packed path).
"""

from __future__ import annotations

import torch


def rotary_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """``[b, s]`` positions -> ``[s, b, 1, head_dim]`` fp32 angles for megatron's attention."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.transpose(0, 1)[:, :, None, :].contiguous()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, the angles' cos / sin cast to ``x``'s dtype first."""
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)
