"""One interface for every media tokenizer (image and speech), plus a registry by kind.

The sequence builders only need ``encode``/``decode``, the codebook size and the code rate, so a
pretrained tokenizer (MAGVIT-v2, GLM-4-Voice) and a built-in demo tokenizer fitted to local data
are interchangeable: ``load_media_tokenizer(kind, path)`` picks the implementation.

Conventions (shared by all implementations):
- images: float tensors ``[b, 3, H, W]`` in ``[-1, 1]``; codes ``[b, h, w]`` (int64, row-major
  when flattened, which is the order the image tokens take in a sequence).
- speech: a 16 kHz mono waveform per item (1-D float tensor, or a ``[b, T]`` tensor of equal
  lengths); codes are one 1-D int64 tensor per item, ``ceil(samples / 1280)`` long at 12.5 Hz.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch

SPEECH_SAMPLE_RATE = 16_000

Modality = Literal["image", "speech"]


class MediaTokenizer(ABC):
    """Discrete tokenizer of one modality: media <-> integer codes in ``[0, codebook_size)``."""

    modality: ClassVar[Modality]

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct codes (the size of this modality's block in the unified vocabulary)."""

    @property
    def device(self) -> torch.device:
        """Where :meth:`encode` takes its inputs (decoded media are moved there, not before:
        GPU-decoded media stay on the GPU for a tokenizer that runs there)."""
        return torch.device("cpu")

    @abstractmethod
    def encode(self, batch):
        """Media batch -> codes (see the module docstring for the shapes)."""

    @abstractmethod
    def decode(self, codes):
        """Codes -> media, the inverse of :meth:`encode` up to quantisation error."""


class ImageTokenizer(MediaTokenizer):
    modality: ClassVar[Modality] = "image"

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Native square resolution in pixels (the one ``codes_per_image`` refers to)."""

    @property
    @abstractmethod
    def downsample(self) -> int:
        """Pixels per code along each side."""

    @property
    def codes_per_image(self) -> int:
        return (self.image_size // self.downsample) ** 2

    @abstractmethod
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` in [-1, 1] -> int64 codes ``[b, H/downsample, W/downsample]``."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes ``[b, h, w]`` -> images ``[b, 3, h*downsample, w*downsample]`` in [-1, 1]."""


class SpeechTokenizer(MediaTokenizer):
    modality: ClassVar[Modality] = "speech"
    sample_rate: ClassVar[int] = SPEECH_SAMPLE_RATE

    @property
    @abstractmethod
    def codes_per_second(self) -> float:
        """Code rate; ``n`` samples give ``ceil(n * codes_per_second / sample_rate)`` codes."""

    @abstractmethod
    def encode(self, batch: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """16 kHz mono waveforms -> one 1-D int64 code tensor per waveform."""

    @property
    def decoded_sample_rate(self) -> int:
        """Sample rate of :meth:`decode`'s waveforms (the input rate unless a vocoder differs)."""
        return self.sample_rate

    @abstractmethod
    def decode(self, codes: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Code sequences -> waveforms at :attr:`decoded_sample_rate` (1-D float tensors)."""


def check_images(batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """Validate an image batch once for every image tokenizer; returns it as float32."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"images must be a float tensor [b, 3, H, W], got {shape}")
    if batch.shape[2] % multiple or batch.shape[3] % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {tuple(batch.shape[2:])}")
    batch = batch.float()
    if not torch.isfinite(batch).all() or batch.abs().max() > 1.0 + 1e-3:
        raise ValueError("images must be finite and scaled to [-1, 1]")
    return batch


def check_codes(codes: torch.Tensor, codebook_size: int, ndim: int) -> torch.Tensor:
    """Validate integer codes (shape rank and range) before a decoder indexes with them."""
    codes = torch.as_tensor(codes)
    if codes.ndim != ndim or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be an integer tensor with {ndim} dims, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
    return codes.long()


def as_waveform_list(batch: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Accept a list of 1-D waveforms or a ``[b, T]`` tensor; validate and return float32 1-D tensors."""
    items = list(batch.unbind(0)) if isinstance(batch, torch.Tensor) and batch.ndim == 2 else list(batch)
    out = []
    for i, wav in enumerate(items):
        wav = torch.as_tensor(wav)
        if wav.ndim != 1 or wav.numel() == 0:
            raise ValueError(f"waveform {i} must be a non-empty 1-D mono signal, got shape {tuple(wav.shape)}")
        wav = wav.float()
        if not torch.isfinite(wav).all():
            raise ValueError(f"waveform {i} has non-finite samples")
        out.append(wav)
    return out


# --- registry ------------------------------------------------------------------------------

Loader = Callable[[Path], MediaTokenizer]
_REGISTRY: dict[str, Loader] = {}


def register_media_tokenizer(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: make ``loader(path)`` available as ``load_media_tokenizer(kind, path)``."""

    def wrap(loader: Loader) -> Loader:
        if kind in _REGISTRY:
            raise ValueError(f"media tokenizer kind {kind!r} is registered twice")
        _REGISTRY[kind] = loader
        return loader

    return wrap


def media_tokenizer_kinds() -> list[str]:
    _import_builtin_kinds()
    return sorted(_REGISTRY)


def load_media_tokenizer(kind: str, path: str | Path) -> MediaTokenizer:
    """Load a tokenizer of ``kind`` (see :func:`media_tokenizer_kinds`) from a local path."""
    _import_builtin_kinds()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown media tokenizer kind {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} tokenizer path not found: {path}")
    return _REGISTRY[kind](path)


def _import_builtin_kinds() -> None:
    """Importing the implementation modules registers them (kept lazy: they pull transformers)."""
    from omnidiff.data.tokenizers import demo_image, demo_speech, glm4_voice, magvit2  # noqa: F401
