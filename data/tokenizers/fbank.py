"""SenseVoice / FunASR ``WavFrontend`` front end: Kaldi fbank -> low-frame-rate stacking -> CMVN.

The released SenseVoiceSmall front end (FunASR ``WavFrontend`` with the model's ``frontend_conf``)
scales a [-1, 1] waveform to the int16 range, computes Kaldi ``compute-fbank-feats`` features
(``torchaudio.compliance.kaldi.fbank``: 25 ms Hamming window, 10 ms shift, ``snip_edges``, per-frame
DC removal, pre-emphasis 0.97, 512-point power spectrum, 80 triangular filters on Kaldi's mel scale
``1127 ln(1 + f/700)`` from 20 Hz to Nyquist, natural log floored at float32 epsilon, energy floor
0), stacks ``lfr_m`` = 7 frames every ``lfr_n`` = 6 (560-d every 60 ms; 3 copies of the first frame
on the left, the last frame repeated on the right) and applies the ``am.mvn`` shift/scale:
``(x + shift) * scale``.

Dither: FunASR's ``WavFrontend`` defaults to ``dither=1.0`` and the released ``config.yaml`` does not
override it, so the release adds N(0, 1) noise (1 int16 LSB) per sample even at inference. This
implementation defaults to ``dither=0.0`` (deterministic features); set it in the config to match.

Two implementations with the same maths: :func:`fbank_reference` / :func:`lfr_reference` (plain
NumPy, float64, one frame at a time) and :func:`fbank` / :func:`lfr` (vectorised torch, the path
used for inference). ``am.mvn`` is Kaldi nnet1 text; :func:`read_am_mvn` / :func:`write_am_mvn`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FLT_EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's log floor (numeric_limits<float>::epsilon)
PREEMPHASIS = 0.97
LOW_FREQ = 20.0


@dataclass(frozen=True)
class FrontendConfig:
    """``frontend_conf`` of the released SenseVoiceSmall ``config.yaml`` (FunASR ``WavFrontend``)."""

    fs: int = 16_000
    window: str = "hamming"
    n_mels: int = 80
    frame_length: int = 25  # ms
    frame_shift: int = 10  # ms
    lfr_m: int = 7
    lfr_n: int = 6
    dither: float = 0.0  # the release's WavFrontend default is 1.0 (see module docstring)
    upsacle_samples: bool = True  # (sic, FunASR's spelling) scale [-1, 1] audio by 2**15

    def __post_init__(self) -> None:
        if self.window not in ("hamming", "hanning", "povey", "rectangular"):
            raise ValueError(f"SenseVoice front end: unsupported window {self.window!r}")

    @property
    def window_size(self) -> int:
        return int(self.fs * self.frame_length / 1000)

    @property
    def window_shift(self) -> int:
        return int(self.fs * self.frame_shift / 1000)

    @property
    def padded_window_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()

    @property
    def feature_dim(self) -> int:
        return self.n_mels * self.lfr_m

    @property
    def seconds_per_frame(self) -> float:
        """Duration of one LFR frame (60 ms for the release)."""
        return self.lfr_n * self.frame_shift / 1000

    def num_fbank_frames(self, num_samples: int) -> int:
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift

    def num_lfr_frames(self, num_samples: int) -> int:
        """LFR frames for ``num_samples`` samples: ``ceil(fbank_frames / lfr_n)``."""
        return math.ceil(self.num_fbank_frames(num_samples) / self.lfr_n)


def _check_length(num_samples: int, cfg: FrontendConfig) -> None:
    if num_samples < cfg.window_size:
        raise ValueError(
            f"waveform too short for the fbank front end: {num_samples} samples < one "
            f"{cfg.frame_length} ms window ({cfg.window_size} samples at {cfg.fs} Hz)"
        )


# --- plain reference (NumPy, float64, one frame at a time) ------------------------------------

def _window_reference(kind: str, size: int) -> np.ndarray:
    n = np.arange(size)
    if kind == "rectangular":
        return np.ones(size)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))
    if kind == "hanning":
        return hann
    if kind == "povey":
        return hann**0.85
    return 0.54 - 0.46 * np.cos(2 * np.pi * n / (size - 1))


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


def mel_banks_reference(n_mels: int, padded_window: int, fs: int) -> np.ndarray:
    """``[n_mels, padded_window // 2 + 1]`` Kaldi triangular filters (last FFT bin has weight 0)."""
    nyquist = fs / 2
    mel_low, mel_high = _mel(LOW_FREQ), _mel(nyquist)
    delta = (mel_high - mel_low) / (n_mels + 1)
    banks = np.zeros((n_mels, padded_window // 2 + 1))
    for m in range(n_mels):
        left, center, right = mel_low + m * delta, mel_low + (m + 1) * delta, mel_low + (m + 2) * delta
        for k in range(padded_window // 2):
            mel = _mel(k * fs / padded_window)
            if left < mel < right:
                banks[m, k] = (mel - left) / (center - left) if mel <= center else (right - mel) / (right - center)
    return banks


def fbank_reference(waveform: np.ndarray, cfg: FrontendConfig = FrontendConfig()) -> np.ndarray:
    """``[samples]`` waveform in [-1, 1] -> ``[frames, n_mels]`` log-mel fbank (float64, no dither)."""
    x = np.asarray(waveform, dtype=np.float64)
    _check_length(x.size, cfg)
    if cfg.upsacle_samples:
        x = x * 32768.0
    size, shift, padded = cfg.window_size, cfg.window_shift, cfg.padded_window_size
    window = _window_reference(cfg.window, size)
    banks = mel_banks_reference(cfg.n_mels, padded, cfg.fs)
    out = []
    for t in range(cfg.num_fbank_frames(x.size)):
        frame = x[t * shift : t * shift + size].copy()
        frame -= frame.mean()
        previous = np.concatenate([frame[:1], frame[:-1]])
        frame = (frame - PREEMPHASIS * previous) * window
        power = np.abs(np.fft.rfft(frame, n=padded)) ** 2
        out.append(np.log(np.maximum(banks @ power, FLT_EPSILON)))
    return np.stack(out)


def lfr_reference(feats: np.ndarray, lfr_m: int = 7, lfr_n: int = 6) -> np.ndarray:
    """Stack ``lfr_m`` frames every ``lfr_n`` the way FunASR's ``apply_lfr`` does."""
    frames = list(feats)
    frames = [frames[0]] * ((lfr_m - 1) // 2) + frames
    out = []
    for i in range(math.ceil(len(feats) / lfr_n)):
        chunk = frames[i * lfr_n : i * lfr_n + lfr_m]
        chunk = chunk + [frames[-1]] * (lfr_m - len(chunk))
        out.append(np.concatenate(chunk))
    return np.stack(out)


# --- fast path (vectorised torch) -------------------------------------------------------------

@lru_cache(maxsize=8)
def _mel_matrix(n_mels: int, padded_window: int, fs: int) -> torch.Tensor:
    """``[padded_window // 2 + 1, n_mels]`` float64 filterbank, vectorised."""
    nyquist = fs / 2
    mel_low, mel_high = _mel(LOW_FREQ), _mel(nyquist)
    delta = (mel_high - mel_low) / (n_mels + 1)
    edges = torch.tensor(mel_low + delta * np.arange(n_mels + 2), dtype=torch.float64)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    mel = 1127.0 * torch.log1p(torch.arange(padded_window // 2 + 1, dtype=torch.float64) * (fs / padded_window) / 700.0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    banks[:, -1] = 0.0  # Kaldi's banks cover the first padded_window/2 bins only
    return banks.t().contiguous()


def _window(kind: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    if kind == "rectangular":
        return torch.ones(size, dtype=dtype)
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=dtype)
    hann = torch.hann_window(size, periodic=False, dtype=dtype)
    return hann.pow(0.85) if kind == "povey" else hann


def fbank(
    waveform: torch.Tensor,
    cfg: FrontendConfig = FrontendConfig(),
    *,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[samples]`` waveform in [-1, 1] -> ``[frames, n_mels]`` log-mel fbank, computed in ``dtype``."""
    x = torch.as_tensor(waveform).to(dtype).flatten()
    _check_length(x.numel(), cfg)
    if cfg.upsacle_samples:
        x = x * 32768.0
    frames = x.unfold(0, cfg.window_size, cfg.window_shift)  # [T, window]
    if cfg.dither:
        frames = frames + cfg.dither * torch.randn(frames.shape, dtype=dtype, generator=generator)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = (frames - PREEMPHASIS * previous) * _window(cfg.window, cfg.window_size, dtype)
    power = torch.fft.rfft(frames, n=cfg.padded_window_size).abs().pow(2)
    mel = power @ _mel_matrix(cfg.n_mels, cfg.padded_window_size, cfg.fs).to(dtype)
    return mel.clamp_min(FLT_EPSILON).log()


def lfr(feats: torch.Tensor, lfr_m: int = 7, lfr_n: int = 6) -> torch.Tensor:
    """``[T, d]`` -> ``[ceil(T / lfr_n), lfr_m * d]``: frame ``i`` stacks inputs
    ``clamp(i * lfr_n + j - (lfr_m - 1) // 2, 0, T - 1)`` for ``j < lfr_m``."""
    t = feats.shape[0]
    starts = torch.arange(math.ceil(t / lfr_n)) * lfr_n - (lfr_m - 1) // 2
    index = (starts[:, None] + torch.arange(lfr_m)[None, :]).clamp_(0, t - 1)
    return feats[index].reshape(index.shape[0], -1)


def apply_cmvn(feats: torch.Tensor, cmvn: torch.Tensor) -> torch.Tensor:
    """``(feats + shift) * scale`` with ``cmvn = [shift; scale]`` of shape ``[2, dim]``."""
    return (feats + cmvn[0].to(feats.dtype)) * cmvn[1].to(feats.dtype)


def wav_frontend(
    waveform: torch.Tensor, cfg: FrontendConfig, cmvn: torch.Tensor | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The whole ``WavFrontend``: ``[samples]`` -> float32 ``[ceil(frames / lfr_n), n_mels * lfr_m]``."""
    feats = lfr(fbank(waveform, cfg, generator=generator), cfg.lfr_m, cfg.lfr_n)
    if cmvn is not None:
        feats = apply_cmvn(feats, cmvn)
    return feats.float()


# --- am.mvn -----------------------------------------------------------------------------------

def read_am_mvn(path: str | Path, dim: int | None = None) -> torch.Tensor:
    """``[2, dim]`` float32 ``[shift; scale]`` from a Kaldi nnet1 ``am.mvn`` (``<AddShift>``, ``<Rescale>``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = []
    for tag in ("<AddShift>", "<Rescale>"):
        found = re.search(re.escape(tag) + r"[^\[]*\[([^\]]*)\]", text)
        if found is None:
            raise ValueError(f"{path} is not a Kaldi am.mvn file: no {tag} block")
        try:
            rows.append([float(v) for v in found.group(1).split()])
        except ValueError as err:
            raise ValueError(f"{path}: non-numeric value in the {tag} block ({err})") from None
    if len(rows[0]) != len(rows[1]) or (dim is not None and len(rows[0]) != dim):
        raise ValueError(
            f"{path}: CMVN dimensions do not match: AddShift {len(rows[0])}, Rescale {len(rows[1])}, expected {dim}"
        )
    return torch.tensor(rows, dtype=torch.float32)


def write_am_mvn(path: str | Path, shift: torch.Tensor, scale: torch.Tensor) -> Path:
    """Write ``shift``/``scale`` in the released ``am.mvn`` layout (Kaldi nnet1 text)."""
    path = Path(path)
    dim = shift.numel()
    values = lambda t: " ".join(f"{float(v):.9g}" for v in t.flatten())  # noqa: E731
    path.write_text(
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {values(shift)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {values(scale)} ]\n"
        "</Nnet>\n",
        encoding="utf-8",
    )
    return path
