"""Log-mel analysis and its approximate inverse (pseudo-inverse filterbank + Griffin-Lim), in torch.

Used by the demo speech tokenizer, whose decoded codes must be listenable without a neural
vocoder. The filterbank comes from ``transformers.audio_utils`` (torchaudio is not a dependency).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.audio_utils import mel_filter_bank

LOG_FLOOR = 1e-5


@dataclass(frozen=True)
class MelAnalysis:
    sample_rate: int = 16_000
    n_fft: int = 1024
    hop_length: int = 320
    n_mels: int = 80

    @cached_property
    def filterbank(self) -> torch.Tensor:
        """``[n_fft/2 + 1, n_mels]`` Slaney-normalised triangular filters over 0 .. Nyquist."""
        fb = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=self.n_mels, min_frequency=0.0,
            max_frequency=self.sample_rate / 2, sampling_rate=self.sample_rate, norm="slaney", mel_scale="slaney",
        )
        return torch.from_numpy(fb).float()

    @cached_property
    def inverse_filterbank(self) -> torch.Tensor:
        """``[n_mels, n_fft/2 + 1]`` least-squares inverse of :attr:`filterbank`."""
        return torch.linalg.pinv(self.filterbank)

    @cached_property
    def window(self) -> torch.Tensor:
        return torch.hann_window(self.n_fft)

    def stft(self, wav: torch.Tensor) -> torch.Tensor:
        """``[T]`` -> complex ``[T // hop + 1, n_fft/2 + 1]`` (centred frames)."""
        return torch.stft(wav, self.n_fft, self.hop_length, window=self.window, return_complex=True).t()

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """``[T]`` waveform -> ``[T // hop + 1, n_mels]`` natural-log magnitude mel spectrogram."""
        return (self.stft(wav).abs() @ self.filterbank).clamp_min(LOG_FLOOR).log()

    def invert(self, log_mel: torch.Tensor, length: int, iters: int = 32, seed: int = 0) -> torch.Tensor:
        """Log-mel ``[length // hop + 1, n_mels]`` -> waveform ``[length]`` by fast Griffin-Lim.

        Magnitudes come from the pseudo-inverse filterbank (clipped at 0); phases from ``iters``
        Griffin-Lim iterations with momentum 0.99 (Perraudin et al. 2013).
        """
        magnitude = (log_mel.exp() @ self.inverse_filterbank).clamp_min(0.0).t()  # [freq, frames]
        gen = torch.Generator().manual_seed(seed)
        phase = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=gen))
        previous = torch.zeros_like(phase)
        for _ in range(iters):
            wav = self._istft(magnitude * phase, length)
            rebuilt = self.stft(wav).t()
            accelerated = rebuilt - 0.99 / 1.99 * previous
            previous = rebuilt
            phase = accelerated / accelerated.abs().clamp_min(1e-8)
        return self._istft(magnitude * phase, length)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        return torch.istft(spec, self.n_fft, self.hop_length, window=self.window, length=length)
