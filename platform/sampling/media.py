"""Media in and out of sampling: files -> codes through the run's tokenizers, codes -> PNG / WAV.

Inputs are prepared exactly as training prepares them (:mod:`omnidiff.data.media.dali_reference`,
the transforms the DALI pipelines match): images short-side bicubic resize + centre crop to
``data.image_size``, scaled to [-1, 1]; speech decoded to mono and resampled to 16 kHz.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from omnidiff import UserError
from omnidiff.data.config import MediaTokenizerRef
from omnidiff.data.media import dali_reference
from omnidiff.data.tokenizers.base import (
    ImageTokenizer, MediaTokenizer, SpeechTokenizer, load_media_tokenizer)

Tensor = torch.Tensor


class MediaError(UserError):
    """A media file or tokenizer that cannot be used (missing, corrupt, wrong kind)."""


def load_tokenizer(ref: MediaTokenizerRef | None, modality: str, codebook_block: int,
                   key: str) -> MediaTokenizer:
    """The run's ``key`` tokenizer (``data.image_tokenizer`` ...), checked against its
    vocabulary block; every failure is one line naming the key and path."""
    if ref is None:
        raise MediaError(f"{key} is not set in the run config (give it with --set "
                         f"{key}.kind=... --set {key}.path=...)")
    try:
        tokenizer = load_media_tokenizer(ref.kind, ref.path)
    except Exception as err:  # noqa: BLE001 - unreadable user files fail in many library ways
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MediaError(f"{key} ({ref.kind} at {ref.path}): cannot load ({message})") from None
    if tokenizer.modality != modality:
        raise MediaError(f"{key}: a {tokenizer.modality} tokenizer, expected {modality}")
    if tokenizer.codebook_size > codebook_block:
        raise MediaError(f"{key}: {tokenizer.codebook_size} codes do not fit the vocabulary's "
                         f"{codebook_block} {modality} ids")
    return tokenizer


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise MediaError(f"{path}: cannot read ({err.strerror or err})") from None


def encode_image_file(path: str | Path, tokenizer: ImageTokenizer, size: int) -> Tensor:
    """An image file -> its row-major codes (1-D), prepared as training prepares input images."""
    try:
        image = dali_reference.decode_image(_read(path))
    except (OSError, ValueError) as err:
        raise MediaError(f"{path}: not a readable image ({err})") from None
    pixels = torch.from_numpy(dali_reference.image_to_model_input(image, size))
    try:
        return tokenizer.encode(pixels[None])[0].reshape(-1)
    except ValueError as err:  # e.g. data.image_size not a multiple of the tokenizer's patch
        raise MediaError(f"{path}: the image tokenizer refuses it at data.image_size={size} "
                         f"({err})") from None


def encode_speech_file(path: str | Path, tokenizer: SpeechTokenizer) -> Tensor:
    """A speech file -> its codes, resampled to the tokenizer's 16 kHz mono input."""
    try:
        wave = dali_reference.audio_to_model_input(_read(path), tokenizer.sample_rate)
    except (RuntimeError, ValueError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise MediaError(f"{path}: not a readable audio file ({err})") from None
    if not len(wave):
        raise MediaError(f"{path}: empty audio")
    return tokenizer.encode([torch.from_numpy(wave)])[0]


def decode_image(codes: Tensor, tokenizer: ImageTokenizer) -> Tensor:
    """Row-major codes of a square grid -> one image ``[3, H, W]`` in [-1, 1]. Codes past the
    tokenizer's codebook (the vocabulary block can be larger) are clamped, as the release does."""
    side = int(round(len(codes) ** 0.5))
    if side * side != len(codes):
        raise ValueError(f"{len(codes)} image codes do not form a square grid")
    codes = codes.clamp(0, tokenizer.codebook_size - 1)
    return tokenizer.decode(codes.reshape(1, side, side))[0]


def decode_speech(codes: Tensor, tokenizer: SpeechTokenizer) -> Tensor:
    """Speech codes -> one waveform at ``tokenizer.decoded_sample_rate`` (codes clamped)."""
    return tokenizer.decode([codes.clamp(0, tokenizer.codebook_size - 1)])[0]


def rgb_pixels(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` uint8 RGB, as the image is saved and seen."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def png_bytes(image: Tensor) -> bytes:
    """``[3, H, W]`` in [-1, 1] -> PNG file contents."""
    buffer = io.BytesIO()
    Image.fromarray(rgb_pixels(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(rows: list[list[Tensor]], gap: int = 2, min_size: int = 0) -> Tensor:
    """Images ``[3, H, W]`` (equal sizes) in rows, separated by ``gap`` white pixels; each
    enlarged by a whole factor (nearest neighbour: codes stay visible as blocks) to at least
    ``min_size`` pixels high."""
    scale = max(1, -(-min_size // rows[0][0].shape[1]))
    rows = [[image.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for image in row]
            for row in rows]

    def join(images: list[Tensor], dim: int) -> Tensor:
        shape = list(images[0].shape)
        shape[dim] = gap
        spacer = torch.ones(shape)
        parts = [part for image in images for part in (image, spacer)][:-1]
        return torch.cat(parts, dim=dim)

    return join([join(row, dim=2) for row in rows], dim=1)


def wav_bytes(wave: Tensor, sample_rate: int) -> bytes:
    """A mono waveform -> 16-bit WAV file contents."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(wave.detach().float().clamp(-1, 1)), sample_rate,
                    format="WAV", subtype="PCM_16")
    return buffer.getvalue()
