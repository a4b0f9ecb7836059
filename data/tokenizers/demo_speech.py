"""Built-in demo speech tokenizer: k-means over log-mel frames at 12.5 Hz (no pretrained weights).

One code covers 80 ms (1280 samples at 16 kHz) and stands for ``frames_per_code`` stacked
log-mel frames (hop 1280 / frames_per_code): stacking keeps the within-80 ms detail that makes
the Griffin-Lim resynthesis intelligible, at the GLM-4-Voice code rate. ``n`` samples are zero
padded to a multiple of 1280 and give ``ceil(n / 1280)`` codes. Saved as one safetensors file
(the centroids) whose metadata holds the JSON config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omnidiff.data.tokenizers.audio_features import MelAnalysis
from omnidiff.data.tokenizers.base import SpeechTokenizer, as_waveform_list, check_codes, register_media_tokenizer
from omnidiff.data.tokenizers.checkpoint import read_single_file, save_single_file
from omnidiff.data.tokenizers.kmeans import fit_kmeans, nearest_centroid

KIND = "kmeans_speech"
MAX_CODEBOOK = 16_384  # the speech block of the unified vocabulary
SAMPLES_PER_CODE = 1280  # 80 ms at 16 kHz = 12.5 codes per second


@dataclass(frozen=True)
class MelKMeansConfig:
    codebook_size: int = 512
    n_mels: int = 80
    n_fft: int = 1024
    frames_per_code: int = 4
    griffin_lim_iters: int = 32

    def __post_init__(self) -> None:
        if SAMPLES_PER_CODE % self.frames_per_code:
            raise ValueError(f"frames_per_code must divide {SAMPLES_PER_CODE}, got {self.frames_per_code}")

    @property
    def analysis(self) -> MelAnalysis:
        return MelAnalysis(n_fft=self.n_fft, hop_length=SAMPLES_PER_CODE // self.frames_per_code, n_mels=self.n_mels)


class MelKMeansSpeechTokenizer(SpeechTokenizer):
    def __init__(self, config: MelKMeansConfig, centroids: torch.Tensor) -> None:
        expected = (config.codebook_size, config.frames_per_code * config.n_mels)
        if tuple(centroids.shape) != expected:
            raise ValueError(f"mel k-means centroids have shape {tuple(centroids.shape)}, expected {expected}")
        self.config = config
        self.analysis = config.analysis
        self.centroids = centroids.float()

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codes_per_second(self) -> float:
        return self.sample_rate / SAMPLES_PER_CODE

    def code_frames(self, wav: torch.Tensor) -> torch.Tensor:
        """``[T]`` -> ``[ceil(T / 1280), frames_per_code * n_mels]``: the vectors that get quantised."""
        padded = F.pad(wav, (0, -wav.numel() % SAMPLES_PER_CODE))
        frames = self.analysis.log_mel(padded)[:-1]  # T/hop + 1 centred frames; the last is past the end
        return frames.reshape(-1, self.config.frames_per_code * self.config.n_mels)

    @classmethod
    def fit(cls, waveforms, codebook_size: int, seed: int, *, epochs: int = 20, **config) -> MelKMeansSpeechTokenizer:
        """Cluster the 80 ms log-mel vectors of 16 kHz ``waveforms`` into ``codebook_size`` codes."""
        if not 1 <= codebook_size <= MAX_CODEBOOK:
            raise ValueError(f"speech codebook size must be in [1, {MAX_CODEBOOK}], got {codebook_size}")
        cfg = MelKMeansConfig(codebook_size=codebook_size, **config)
        probe = cls(cfg, torch.zeros(codebook_size, cfg.frames_per_code * cfg.n_mels))
        vectors = torch.cat([probe.code_frames(w) for w in as_waveform_list(waveforms)])
        return cls(cfg, fit_kmeans(vectors, codebook_size, seed, epochs=epochs))

    def encode(self, batch) -> list[torch.Tensor]:
        return [nearest_centroid(self.code_frames(w), self.centroids) for w in as_waveform_list(batch)]

    def decode_log_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[n]`` -> the quantised log-mel frames ``[n * frames_per_code, n_mels]``."""
        codes = check_codes(codes, self.codebook_size, ndim=1)
        if codes.numel() == 0:
            raise ValueError("cannot decode an empty speech code sequence")
        return self.centroids[codes].reshape(-1, self.config.n_mels)

    def decode(self, codes) -> list[torch.Tensor]:
        """Codes -> 16 kHz waveforms of ``1280 * len(codes)`` samples (Griffin-Lim)."""
        rows = list(codes.unbind(0)) if isinstance(codes, torch.Tensor) and codes.ndim == 2 else list(codes)
        out = []
        for row in rows:
            mel = self.decode_log_mel(torch.as_tensor(row))
            mel = torch.cat([mel, mel[-1:]])  # restore the frame centred at the very end
            out.append(self.analysis.invert(mel, SAMPLES_PER_CODE * len(row), self.config.griffin_lim_iters))
        return out

    def save(self, path: str | Path) -> Path:
        return save_single_file(path, KIND, self.config, {"centroids": self.centroids})

    @classmethod
    def load(cls, path: str | Path) -> MelKMeansSpeechTokenizer:
        config, tensors = read_single_file(path, KIND)
        return cls(MelKMeansConfig(**config), tensors["centroids"])


@register_media_tokenizer(KIND)
def _load(path: Path) -> MelKMeansSpeechTokenizer:
    return MelKMeansSpeechTokenizer.load(path)
