"""HiFT vocoder of GLM-4-Voice (CosyVoice ``HiFTGenerator``): 80-bin mel -> 22,050 Hz waveform.

Neural source filter + iSTFTNet, as released in ``hift.pt``:
``f0_predictor`` (``condnet.{0,2,4,6,8}``: 5 x weight-normed Conv1d k3 + ELU, ``classifier``; |.|)
-> f0 per mel frame, upsampled x256 (nearest) -> ``m_source``: harmonic sines of f0 (9 harmonics,
amplitude ``nsf_alpha``, unvoiced below ``nsf_voiced_threshold`` Hz, noise ``nsf_sigma``) merged by
``l_linear`` + tanh -> STFT (n_fft 16, hop 4, periodic Hann) -> fused into the upsampling path:
``conv_pre`` -> per stage leaky ReLU, ``ups.i`` (weight-normed ConvTranspose1d), reflection pad on the
last stage, + ``source_resblocks.i(source_downs.i(source STFT))``, mean of the stage's
``resblocks`` -> leaky ReLU (slope 0.01) -> ``conv_post`` -> magnitude ``exp(.)`` (clipped at 100) and
phase ``sin(.)`` -> iSTFT -> clamp to ``audio_limit``. ResBlocks use Snake activations
(``activations{1,2}.j.alpha``) and weight-normed convs.

Weight norm is stored as in the release (old ``torch.nn.utils.weight_norm``): ``weight_g`` and
``weight_v`` per conv; the newer ``parametrizations.weight.original{0,1}`` spelling is accepted by
:func:`rename_weight_norm_keys`. ``m_source``'s random harmonic phases and noise come from a seeded
generator, so decoding is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HIFT_SEED = 0


@dataclass(frozen=True)
class HiftConfig:
    """``hift`` of the released ``config.yaml``; defaults are glm-4-voice-decoder's."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22_050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_num_class: int = 1
    f0_cond_channels: int = 512

    def __post_init__(self) -> None:
        if not len(self.upsample_rates) == len(self.upsample_kernel_sizes) == len(self.source_resblock_kernel_sizes):
            raise ValueError("HiFT config: one upsample kernel and one source resblock per upsample stage")

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (256 for the release)."""
        return math.prod(self.upsample_rates) * self.hop_len


def rename_weight_norm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``*.parametrizations.weight.original0/1`` (torch >= 2.1 weight norm) -> ``*.weight_g/weight_v``."""
    out = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        out[key.replace(".parametrizations.weight.original1", ".weight_v")] = value
    return out


class _WeightNorm(nn.Module):
    """Shared part of the weight-normed convolutions: ``weight = g * v / ||v||`` (norm over dims 1..)."""

    def _init_weight_norm(self, shape: tuple[int, ...], out_channels: int, bias: bool) -> None:
        self.weight_v = nn.Parameter(torch.empty(shape).normal_(0.0, 0.01))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(1, 2), keepdim=True).clone())
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(1, 2), keepdim=True))


class WNConv1d(_WeightNorm):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self._init_weight_norm((cout, cin, kernel), cout, True)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNorm):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self._init_weight_norm((cin, cout, kernel), cout, True)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)


class Snake(nn.Module):
    """``x + sin^2(alpha x) / alpha`` per channel (linear-scale alpha, as released)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + torch.sin(x * alpha).pow(2) / (alpha + 1e-9)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        pad = lambda d: (kernel * d - d) // 2  # noqa: E731
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel, padding=pad(d), dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel, padding=pad(1)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``[b, 80, T]`` -> f0 in Hz ``[b, T]``."""
        return self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1).abs()


class SourceModuleHnNSF(nn.Module):
    def __init__(self, cfg: HiftConfig) -> None:
        super().__init__()
        self.config = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample-rate f0 ``[b, n]`` -> merged excitation ``[b, 1, n]``."""
        cfg = self.config
        b, n = f0.shape
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, dtype=torch.float64)
        phase_turns = torch.cumsum(f0.double()[:, None, :] * harmonics[None, :, None] / cfg.sampling_rate, dim=-1) % 1
        offset = (torch.rand(b, cfg.nb_harmonics + 1, 1, generator=generator) * 2 - 1) * math.pi
        offset[:, 0] = 0.0
        sines = cfg.nsf_alpha * torch.sin(2 * math.pi * phase_turns.float() + offset)
        voiced = (f0 > cfg.nsf_voiced_threshold).float()[:, None, :]
        noise_amp = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
        sines = sines * voiced + noise_amp * torch.randn(sines.shape, generator=generator)
        return torch.tanh(self.l_linear(sines.transpose(1, 2))).transpose(1, 2)


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiftConfig = HiftConfig()) -> None:
        super().__init__()
        self.config = cfg
        base = cfg.base_channels
        self.m_source = SourceModuleHnNSF(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, (k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        rates = [1, *cfg.upsample_rates[::-1][:-1]]
        cumulative = [math.prod(rates[: i + 1]) for i in range(len(rates))][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        sources = zip(cumulative, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
        for i, (u, k, d) in enumerate(sources):
            ch = base // 2 ** (i + 1)
            down = nn.Conv1d(cfg.n_fft + 2, ch, 1) if u == 1 else nn.Conv1d(cfg.n_fft + 2, ch, u * 2, u, padding=u // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = WNConv1d(base // 2 ** len(self.ups), cfg.n_fft + 2, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_num_class, cfg.in_channels, cfg.f0_cond_channels)

    def _window(self) -> torch.Tensor:
        return torch.hann_window(self.config.n_fft, periodic=True)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, seed: int = HIFT_SEED) -> torch.Tensor:
        """``[b, 80, T]`` mel -> ``[b, T * hop_length]`` waveform in [-audio_limit, audio_limit]."""
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        f0 = self.f0_predictor(mel).repeat_interleave(cfg.hop_length, dim=-1)
        source = self.m_source(f0, generator).squeeze(1)
        spec = torch.stft(source, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self._window(), return_complex=True)
        s_stft = torch.cat([spec.real, spec.imag], dim=1)

        x = self.conv_pre(mel)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * n_kernels + j](x) for j in range(n_kernels)) / n_kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = cfg.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])
        wave = torch.istft(torch.polar(magnitude, phase), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self._window())
        return wave.clamp(-cfg.audio_limit, cfg.audio_limit)
