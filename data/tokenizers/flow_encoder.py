"""Token encoder and length regulator of the GLM-4-Voice flow decoder (CosyVoice ``flow.encoder``).

``BlockConformerEncoder`` as released in ``glm-4-voice-decoder``: ``embed.out`` (Linear + LayerNorm,
"linear" input layer) -> x * sqrt(d) with ESPnet relative positions (``rel_pos_espnet``) ->
``encoders.i`` (pre-LN conformer layers without macaron feed-forward and without convolution module:
``norm_mha`` + block relative-position self-attention, ``norm_ff`` + SiLU feed-forward) ->
``after_norm``. Attention is block-causal: token ``i`` sees every token ``j <= i`` plus the rest of
its own block of ``block_size`` tokens (``block_mask_util.create_grid_mask``), which is what lets the
released decoder stream. The ESPnet positional table is computed on the fly (it is not a buffer, so
it has no checkpoint key).

``InterpolateRegulator`` (``length_regulator``): nearest-neighbour resize to the mel length, then
``len(sampling_ratios)`` x (Conv1d k3, GroupNorm, Mish) and a 1x1 Conv1d (``model.{3i, 3i+1, 3n}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FlowEncoderConfig:
    """``flow.encoder`` of the released ``config.yaml`` (defaults = glm-4-voice-decoder)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    block_size: int = 10
    key_bias: bool = True


def block_causal_mask(length: int, block: int) -> torch.Tensor:
    """``[t, t]`` bool: ``j <= i`` or ``j`` in the same block of ``block`` positions as ``i``."""
    pos = torch.arange(length)
    return (pos[None, :] <= pos[:, None]) | (pos[None, :] // block == pos[:, None] // block)


def espnet_rel_positions(length: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 2t - 1, d]`` ESPnet relative encodings for offsets ``t-1, t-2, ..., -(t-1)``."""
    offsets = torch.arange(length - 1, -length, -1, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(2 * length - 1, d_model)
    pe[:, 0::2] = torch.sin(offsets * div)
    pe[:, 1::2] = torch.cos(offsets * div)
    return pe.to(dtype)[None]


class BlockRelPositionAttention(nn.Module):
    """Transformer-XL style relative-position attention (``pos_bias_u``/``pos_bias_v``) with a mask."""

    def __init__(self, heads: int, size: int, key_bias: bool = True) -> None:
        super().__init__()
        self.h, self.d_k = heads, size // heads
        self.linear_q = nn.Linear(size, size)
        self.linear_k = nn.Linear(size, size, bias=key_bias)
        self.linear_v = nn.Linear(size, size)
        self.linear_out = nn.Linear(size, size)
        self.linear_pos = nn.Linear(size, size, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x`` [b, t, d], ``pos`` [1, 2t-1, d], ``allowed`` [b, t, t] bool -> [b, t, d]."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, self.h, self.d_k).transpose(1, 2)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # [b, h, t, 2t-1]
        # key j seen from query i sits at offset i - j, i.e. column (t - 1) - i + j of the table
        index = (t - 1) - torch.arange(t)[:, None] + torch.arange(t)[None, :]
        position = position.gather(-1, index.expand(b, self.h, t, t))
        scores = (content + position) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.softmax(scores, dim=-1).masked_fill(~allowed[:, None], 0.0)
        return self.linear_out(torch.matmul(att, v).transpose(1, 2).reshape(b, t, -1))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    def __init__(self, cfg: FlowEncoderConfig) -> None:
        super().__init__()
        self.self_attn = BlockRelPositionAttention(cfg.attention_heads, cfg.output_size, cfg.key_bias)
        self.feed_forward = PositionwiseFeedForward(cfg.output_size, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(cfg.output_size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos, allowed)
        return x + self.feed_forward(self.norm_ff(x))


class LinearInput(nn.Module):
    """``embed``: Linear + LayerNorm (+ dropout, inactive at inference); keys ``embed.out.{0,1}``."""

    def __init__(self, idim: int, odim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class BlockConformerEncoder(nn.Module):
    def __init__(self, cfg: FlowEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = LinearInput(cfg.input_size, cfg.output_size)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[b, t, input_size]`` + ``[b]`` lengths -> ``[b, t, output_size]``."""
        b, t, _ = x.shape
        valid = torch.arange(t)[None, :] < lengths[:, None]
        allowed = valid[:, None, :] & block_causal_mask(t, self.config.block_size)[None]
        x = self.embed(x) * math.sqrt(self.config.output_size)
        pos = espnet_rel_positions(t, self.config.output_size, x.dtype)
        for layer in self.encoders:
            x = layer(x, pos, allowed)
        return self.after_norm(x)


class InterpolateRegulator(nn.Module):
    def __init__(self, channels: int, sampling_ratios: tuple[int, ...], out_channels: int | None = None,
                 groups: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, out_channels or channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """``[b, t, c]`` -> ``[b, length, c]`` (one utterance length for the whole batch)."""
        x = F.interpolate(x.transpose(1, 2).contiguous(), size=length, mode="nearest")
        return self.model(x).transpose(1, 2).contiguous()
