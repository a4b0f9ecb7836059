"""Plain reference media transforms (PIL, soundfile, NumPy/SciPy) the DALI pipelines must match.

They define the intended output and serve as the baseline of ``jobs/benchmarks/bench_dali.py``:

- image: decode to RGB, bicubic resize (antialiased, PIL's filter) so the short side is ``size``
  (long side rounded to nearest), centre crop ``size x size`` (an odd margin puts the extra pixel
  on the far side, i.e. the offset rounds half up, as DALI does; torchvision rounds half to even),
  scale to [-1, 1], layout CHW float32 (MAGVIT-v2 input, REFERENCE §5);
- audio: decode, average channels to mono, polyphase resample to ``sample_rate``
  (``scipy.signal.resample_poly``; DALI uses a Hann-windowed sinc, they agree away from the edges);
- log-mel: centred STFT frames (reflect padding), DALI's Hann window
  ``sin^2(pi (n + 0.5) / N)``, power spectrum, Slaney mel filters with area normalisation,
  ``10 log10(max(mel, 1e-10))``.
"""

from __future__ import annotations

import io
from functools import lru_cache
from math import gcd

import numpy as np
import soundfile
from PIL import Image
from scipy.signal import resample_poly

LOG_FLOOR_DB = -100.0  # 10 log10(1e-10): the floor of silent mel bins


def decode_image(data: bytes) -> Image.Image:
    """Fully decode (``load`` raises on truncated files) and convert to RGB."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after a short-side resize to ``size``."""
    if width <= height:
        return size, round(height * size / width)
    return round(width * size / height), size


def centre_crop_offset(length: int, size: int) -> int:
    return (length - size + 1) // 2


def image_to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Short-side bicubic resize, centre crop, [-1, 1], CHW float32."""
    width, height = resized_shape(*image.size, size)
    image = image.resize((width, height), Image.BICUBIC)
    left, top = centre_crop_offset(width, size), centre_crop_offset(height, size)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return (pixels / 127.5 - 1.0).transpose(2, 0, 1).copy()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode to mono float32 in [-1, 1] at the file's own rate."""
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1), rate


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave.astype(np.float32)
    step = gcd(rate, target)
    return resample_poly(wave, target // step, rate // step).astype(np.float32)


def audio_to_model_input(data: bytes, sample_rate: int) -> np.ndarray:
    wave, rate = decode_audio(data)
    return resample(wave, rate, sample_rate)


@lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """Slaney-scale triangular filters, each with unit area: ``[n_mels, n_fft // 2 + 1]``."""
    linear_step, log_start = 200.0 / 3, 1000.0
    log_step = np.log(6.4) / 27.0

    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        log_part = log_start / linear_step + np.log(np.maximum(hz, 1e-9) / log_start) / log_step
        return np.where(hz >= log_start, log_part, hz / linear_step)

    def to_hz(mel):
        mel = np.asarray(mel, dtype=np.float64)
        edge = log_start / linear_step
        return np.where(mel >= edge, log_start * np.exp(log_step * (mel - edge)), mel * linear_step)

    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - low) / (centre - low), (high - freqs) / (high - centre)
    return np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (high - low)


def log_mel(wave: np.ndarray, sample_rate: int, n_mels: int, window: int, hop: int) -> np.ndarray:
    """``[n_mels, 1 + len(wave) // hop]`` log-mel power in dB."""
    padded = np.pad(wave.astype(np.float64), (window // 2, window // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, window)[::hop][: 1 + len(wave) // hop]
    taper = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    power = np.abs(np.fft.rfft(frames * taper, axis=1)) ** 2
    mel = mel_filters(n_mels, window, sample_rate) @ power.T
    return (10.0 * np.log10(np.maximum(mel, 1e-10))).astype(np.float32)
