"""GLM-4-Voice flow-matching decoder: speech codes -> 80-bin mel frames at 22050 / 256 Hz.

The released ``flow.pt`` (CosyVoice ``MaskedDiffWithXvec``) is reproduced key for key:
``input_embedding`` (16,384 x 512), ``spk_embed_affine_layer`` (192 -> 80), ``encoder.*``
(:mod:`omnidiff.data.tokenizers.flow_encoder`), ``encoder_proj`` (512 -> 80), ``length_regulator.*``
and ``decoder.estimator.*``, the Matcha-TTS ``ConditionalDecoder`` 1-D U-Net: ``time_mlp``
(``linear_1``/``linear_2`` over a 1000-scaled sinusoidal embedding of t), ``down_blocks.i.{0: resnet,
1.j: transformer, 2: downsample}``, ``mid_blocks.i.{0, 1.j}``, ``up_blocks.i.{0, 1.j, 2}``,
``final_block``, ``final_proj``. A resnet is ``block1``/``block2`` (Conv1d k3 + GroupNorm(8) + Mish,
``block.{0,1}``), ``mlp.1`` (time projection) and ``res_conv``; a transformer block is diffusers'
``BasicTransformerBlock`` (``norm1``, ``attn1.to_{q,k,v}`` without bias, ``attn1.to_out.0``, ``norm3``,
``ff.net.0.proj`` + GELU, ``ff.net.2``).

Inference as released (``flow.inference`` + ``ConditionalCFM``): codes -> embedding -> encoder ->
``encoder_proj`` -> ``mel_frames = floor(codes / input_frame_rate * 22050 / 256)`` by the length
regulator -> Euler ODE from N(0, I) noise (seed 42, as released) over the cosine schedule
``t = 1 - cos(pi/2 * linspace(0, 1, steps + 1))`` with classifier-free guidance
``v = (1 + w) v(mu, spk, cond) - w v(0, 0, 0)``, ``w = inference_cfg_rate`` = 0.7. The speaker
embedding is the release's zero x-vector (after normalisation and the affine layer: its bias) and
there is no prompt, so ``cond`` is zero. Utterances are decoded one at a time (the release asserts
batch 1), so the estimator needs no padding masks; the conditional and unconditional estimator
passes run as one batch of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from omnidiff.data.tokenizers.flow_encoder import BlockConformerEncoder, FlowEncoderConfig, InterpolateRegulator

FLOW_SEED = 42  # ConditionalCFM.forward calls torch.manual_seed(42) before drawing the noise


@dataclass(frozen=True)
class EstimatorConfig:
    """``flow.decoder.estimator`` (``ConditionalDecoder``) of the released ``config.yaml``."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8


@dataclass(frozen=True)
class FlowConfig:
    """``flow`` of the released ``config.yaml``; defaults are glm-4-voice-decoder's."""

    vocab_size: int = 16_384
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    input_frame_rate: float = 12.5
    mel_rate_num: int = 22_050  # mel frames per second = mel_rate_num / mel_rate_den (hard-coded 22050 / 256
    mel_rate_den: int = 256  # in the release's flow.inference)
    encoder: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    regulator_sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # the release's default (``option_steps`` in Omni-Diffusion)

    def __post_init__(self) -> None:
        if self.estimator.in_channels != 4 * self.output_size:
            raise ValueError("flow estimator in_channels must be 4 x output_size (x, mu, speaker, cond)")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"flow t_scheduler must be 'cosine' or 'linear', got {self.t_scheduler!r}")

    def mel_frames(self, num_codes: int) -> int:
        """``floor(codes / input_frame_rate * 22050 / 256)`` computed exactly."""
        rate = Fraction(str(self.input_frame_rate))
        return math.floor(Fraction(num_codes) / rate * Fraction(self.mel_rate_num, self.mel_rate_den))


# --- estimator (Matcha-TTS / diffusers building blocks) -----------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = scale * t.float()[:, None] * freqs[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = Block1D(dim, dim_out)
        self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(x) + self.mlp(t)[:, :, None])
        return h + self.res_conv(x)


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SelfAttention(nn.Module):
    """diffusers ``Attention`` as configured by Matcha (no q/k/v bias, ``to_out`` = [Linear, Dropout])."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` with self-attention only (``norm1``/``attn1``, ``norm3``/``ff``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class ConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.config = cfg
        channels = tuple(cfg.channels)
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks)
            )

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim), transformers(out_ch), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, time_dim), transformers(out_ch)])
            for _ in range(cfg.num_mid_blocks)
        )
        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            in_ch, out_ch = up_channels[i] * 2, up_channels[i + 1]
            last = i == len(up_channels) - 2
            up = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Upsample1D(out_ch)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim), transformers(out_ch), up]))
        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], cfg.out_channels, 1)

    @staticmethod
    def _attend(x: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        x = x.transpose(1, 2)
        for block in blocks:
            x = block(x)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """``x``, ``mu``, ``cond`` [b, 80, T]; ``t`` [b]; ``spks`` [b, 80] -> velocity [b, 80, T]."""
        temb = self.time_mlp(timestep_embedding(t, self.config.in_channels))
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)
        skips = []
        for resnet, blocks, down in self.down_blocks:
            x = self._attend(resnet(x, temb), blocks)
            skips.append(x)
            x = down(x)
        for resnet, blocks in self.mid_blocks:
            x = self._attend(resnet(x, temb), blocks)
        for resnet, blocks, up in self.up_blocks:
            skip = skips.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = up(self._attend(resnet(x, temb), blocks))
        return self.final_proj(self.final_block(x))


class ConditionalCFM(nn.Module):
    """Holds the estimator under the released key prefix ``decoder.estimator``."""

    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.config = cfg
        self.estimator = ConditionalDecoder(cfg.estimator)

    def forward(self, mu: torch.Tensor, spks: torch.Tensor, steps: int, temperature: float = 1.0,
                seed: int = FLOW_SEED) -> torch.Tensor:
        """Euler ODE from noise to mel for one utterance: ``mu`` [1, 80, T], ``spks`` [1, 80]."""
        cfg = self.config
        noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed), dtype=mu.dtype)
        x = noise * temperature
        t_span = torch.linspace(0, 1, steps + 1, dtype=mu.dtype)
        if cfg.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        w = cfg.inference_cfg_rate
        mus = torch.cat([mu, torch.zeros_like(mu)])
        speakers = torch.cat([spks, torch.zeros_like(spks)])
        cond = torch.zeros_like(mus)
        for step in range(steps):
            t, dt = t_span[step], t_span[step + 1] - t_span[step]
            if w > 0:
                v_cond, v_uncond = self.estimator(x.expand(2, -1, -1), mus, t.expand(2), speakers, cond).chunk(2)
                v = (1.0 + w) * v_cond - w * v_uncond
            else:
                v = self.estimator(x, mu, t.expand(1), spks, cond[:1])
            x = x + dt * v
        return x


class FlowDecoder(nn.Module):
    """``MaskedDiffWithXvec`` inference: codes ``[n]`` -> mel ``[80, mel_frames(n)]``."""

    def __init__(self, cfg: FlowConfig = FlowConfig()) -> None:
        super().__init__()
        self.config = cfg
        if cfg.encoder.input_size != cfg.input_size:
            raise ValueError("flow encoder input_size must equal the flow input_size")
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = BlockConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.output_size, cfg.regulator_sampling_ratios)
        self.decoder = ConditionalCFM(cfg)

    @torch.inference_mode()
    def forward(self, codes: torch.Tensor, steps: int | None = None, seed: int = FLOW_SEED) -> torch.Tensor:
        cfg = self.config
        codes = codes.long().clamp_min(0)[None]
        frames = cfg.mel_frames(codes.shape[1])
        if frames == 0:
            return torch.zeros(cfg.output_size, 0)
        h = self.encoder(self.input_embedding(codes), torch.tensor([codes.shape[1]]))
        mu = self.length_regulator(self.encoder_proj(h), frames).transpose(1, 2)
        speaker = self.spk_embed_affine_layer(F.normalize(torch.zeros(1, cfg.spk_embed_dim), dim=1))
        return self.decoder(mu.contiguous(), speaker, cfg.n_timesteps if steps is None else steps, seed=seed)[0]
