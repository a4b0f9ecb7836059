"""MAGVIT-v2 image tokenizer as used by Show-o / MMaDA / Omni-Diffusion (lookup-free quantiser).

Parameter names and shapes follow the public ``showlab/magvitv2`` checkpoint so it loads by key:
``encoder.*`` (conv_in, down[i].block[j], down[i].downsample, mid, norm_out, conv_out,
quant_conv), ``decoder.*`` (post_quant_conv, conv_in, mid, up[i].block[j], up[i].upsample,
norm_out, conv_out) and the LFQ buffers ``quantize.embedding`` / ``quantize.power_vals``.
Note that the released decoder is *not* the encoder reversed: it uses ch_mult [1,1,2,2,4] and
[4,4,3,4,3] res blocks (the encoder [1,2,2,4,4] and [4,3,4,3,4]); both are config fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from omnidiff.data.tokenizers.base import ImageTokenizer, check_codes, check_images, register_media_tokenizer
from omnidiff.data.tokenizers.checkpoint import load_by_key, read_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class MagvitV2Config:
    """Architecture; the defaults are the released 256 px / 8192-code checkpoint."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    z_channels: int = 13
    resolution: int = 256

    def __post_init__(self) -> None:
        if len(self.ch_mult) != len(self.num_res_blocks) or len(self.decoder_ch_mult) != len(self.decoder_num_res_blocks):
            raise ValueError("MAGVIT-v2 config: ch_mult and num_res_blocks must have one entry per level")
        if len(self.ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("MAGVIT-v2 config: encoder and decoder need the same number of levels")
        if any((self.ch * m) % 32 for m in (*self.ch_mult, *self.decoder_ch_mult)):
            raise ValueError("MAGVIT-v2 config: every level's channels must be a multiple of 32 (GroupNorm)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_json(cls, path: Path) -> MagvitV2Config:
        """Read known fields; foreign keys (the release's ``_class_name`` etc.) are ignored."""
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (only at the 16x16 bottleneck)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2) for proj in (self.q, self.k, self.v))  # [b, c, hw]
        attn = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # [b, hw(query), hw(key)]
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding on the right/bottom only (as in the release)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> nn.Module:
    """One resolution level; its attribute names (block, attn, downsample/upsample) are checkpoint keys."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # the release has no per-level attention at 256 px; kept for key parity
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


class Encoder(nn.Module):
    def __init__(self, cfg: MagvitV2Config) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = cfg.ch
        for i, (mult, n_blocks) in enumerate(zip(cfg.ch_mult, cfg.num_res_blocks)):
            out = cfg.ch * mult
            blocks = [ResnetBlock(channels if j == 0 else out, out) for j in range(n_blocks)]
            channels = out
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_level(blocks, None if last else Downsample(channels), "downsample"))
        self.mid = _Mid(channels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, cfg: MagvitV2Config) -> None:
        super().__init__()
        channels = cfg.ch * cfg.decoder_ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = _Mid(channels)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.decoder_ch_mult))):  # built coarse -> fine, stored fine-first
            out = cfg.ch * cfg.decoder_ch_mult[i]
            blocks = [ResnetBlock(channels if j == 0 else out, out) for j in range(cfg.decoder_num_res_blocks[i])]
            channels = out
            levels.insert(0, _level(blocks, Upsample(channels) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """LFQ: each latent channel's sign is one bit; code = bits read MSB-first (channel 0 = MSB)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.register_buffer("power_vals", 2 ** torch.arange(bits - 1, -1, -1))
        codes = torch.arange(2**bits)
        self.register_buffer("embedding", ((codes[:, None] & self.power_vals) > 0).float() * 2 - 1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``[b, bits, h, w]`` latents -> ``[b, h, w]`` codes (a latent of exactly 0 reads as bit 0)."""
        return ((z > 0).long() * self.power_vals.view(1, -1, 1, 1)).sum(1)

    def codes_reference(self, z: torch.Tensor) -> torch.Tensor:
        """Plain nearest-neighbour search over all 2^bits ±1 vectors; must agree with :meth:`codes`."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return torch.cdist(flat, self.embedding).argmin(1).view(z.shape[0], *z.shape[2:])

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """``[b, h, w]`` codes -> ``[b, bits, h, w]`` ±1 latents."""
        return self.embedding[codes].permute(0, 3, 1, 2).contiguous()


class MagvitV2(nn.Module):
    def __init__(self, cfg: MagvitV2Config = MagvitV2Config()) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = LookupFreeQuantizer(cfg.z_channels)


class MagvitV2Tokenizer(ImageTokenizer):
    """Adapter of a :class:`MagvitV2` model to the :class:`ImageTokenizer` interface (eval, no grad)."""

    def __init__(self, model: MagvitV2) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def codebook_size(self) -> int:
        return 2**self.model.config.z_channels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.model.config.resolution

    @property
    def downsample(self) -> int:
        return self.model.config.downsample

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        images = check_images(batch, self.downsample)
        return self.model.quantize.codes(self.model.encoder(images))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self.codebook_size, ndim=3)
        return self.model.decoder(self.model.quantize.latents(codes)).clamp(-1.0, 1.0)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MagvitV2Tokenizer:
        """Weights file, or a directory with weights and an optional ``config.json`` (defaults: release)."""
        path = Path(path)
        config_file = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
        cfg = MagvitV2Config.from_json(config_file) if config_file.is_file() else MagvitV2Config()
        model = MagvitV2(cfg)
        load_by_key(model, read_state_dict(path), what=f"MAGVIT-v2 ({path})")
        return cls(model)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the layout :meth:`from_pretrained` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.model.config), indent=2))
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory


@register_media_tokenizer("magvitv2")
def _load(path: Path) -> MagvitV2Tokenizer:
    return MagvitV2Tokenizer.from_pretrained(path)
