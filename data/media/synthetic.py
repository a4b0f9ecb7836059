"""Synthetic media shards for tests and benchmarks: generated images and tones, made at run time.

Images are smooth colour fields plus mild noise (so JPEG/WebP behave as on photos, unlike pure
noise); audio is a few band-limited tones (below 6 kHz and 0.4 x the file's rate, so resampling to
16 kHz neither aliases nor loses anything).
Sample layouts follow the Omni-Diffusion tasks: input image, generated image, input speech,
generated speech, and spoken VQA (speech + image in, text + speech out).
:func:`write_synthetic_shards` can corrupt chosen samples on purpose (:data:`CORRUPTIONS`).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from omnidiff.data.media.shards import ShardWriter, audio_member, image_member

# Deliberate defects: each is rejected by the reader with a reason (``huge_image`` is legal but
# large: it must pass within the decode budget).
CORRUPTIONS = ("truncated_image", "garbage_audio", "bad_json", "missing_field", "nan_audio",
               "inf_audio", "zero_frames_audio", "empty_image", "bomb_image", "bmp_image",
               "deep_json", "json_array", "wrong_types", "huge_json", "huge_image")
HUGE_IMAGE_SIDE = 8000

_LAYOUTS = (  # task, messages (role, content), generated-or-not per placeholder is implied by role
    ("captioning", (("user", "Describe the image.\n<image>"), ("assistant", "A synthetic scene."))),
    ("text_to_image", (("user", "Generate an image based on the provided text description.\n"
                                "A synthetic scene."), ("assistant", "<image>"))),
    ("asr", (("user", "Convert the speech to text.\n<speech>"), ("assistant", "a tone"))),
    ("tts", (("user", "Convert the text to speech.\na tone"), ("assistant", "<speech>"))),
    ("spoken_vqa", (("system", "Please response the input audio based on the given image."),
                    ("user", "<speech>\n<image>"), ("assistant", "A synthetic scene.\n<speech>"))),
)


def smooth_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``[height, width, 3]`` uint8: random low-frequency colour waves plus noise (sigma 6)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [127 + 100 * np.sin(rng.uniform(2, 9) * x + rng.uniform(1, 7) * y
                                   + rng.uniform(0, 6)) for _ in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode_image(pixels: np.ndarray, ext: str) -> bytes:
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return buffer.getvalue()


def tones(rng: np.random.Generator, rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """``[frames, channels]`` float: eight sines in [80 Hz, min(6 kHz, 0.4 rate)], peak 0.8."""
    t = np.arange(int(rate * seconds)) / rate
    freqs = rng.uniform(80, min(6000, 0.4 * rate), 8)
    wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs)
    wave = 0.8 * wave / np.abs(wave).max()
    return np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1)


def encode_audio(wave: np.ndarray, rate: int, ext: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=ext.upper(), subtype="PCM_16")
    return buffer.getvalue()


def synthetic_sample(rng: np.random.Generator, index: int,
                     image_sizes: Sequence[tuple[int, int]] = ((96, 64), (64, 96), (131, 200)),
                     audio_rates: Sequence[int] = (16_000, 22_050, 48_000),
                     image_exts: Sequence[str] = ("jpg", "png", "webp"),
                     audio_exts: Sequence[str] = ("wav", "flac"),
                     audio_seconds: float = 0.5) -> dict:
    """Arguments of :meth:`ShardWriter.write` for sample ``index`` (layouts rotate with it)."""
    task, turns = _LAYOUTS[index % len(_LAYOUTS)]
    messages = [{"role": role, "content": content} for role, content in turns]
    n_images = sum(m["content"].count("<image>") for m in messages)
    n_audios = sum(m["content"].count("<speech>") for m in messages)
    images = []
    for _ in range(n_images):
        width, height = image_sizes[rng.integers(len(image_sizes))]
        ext = image_exts[rng.integers(len(image_exts))]
        images.append((ext, encode_image(smooth_image(rng, width, height), ext)))
    audios = []
    for _ in range(n_audios):
        rate = audio_rates[rng.integers(len(audio_rates))]
        ext = audio_exts[rng.integers(len(audio_exts))]
        wave = tones(rng, rate, audio_seconds, 1 + rng.integers(2))
        audios.append((ext, encode_audio(wave, rate, ext)))
    return {"key": f"sample{index:07d}", "task": task, "messages": messages, "images": images,
            "audios": audios}


def _float_wav(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, values.astype(np.float32), 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


@functools.cache
def huge_png(side: int = HUGE_IMAGE_SIDE) -> bytes:
    """A legal ``side x side`` PNG (a flat colour: small on disk, large once decoded)."""
    return encode_image(np.full((side, side, 3), (40, 120, 200), np.uint8), "png")


def _replace_media(members: dict, prefix: str, data: bytes, key: str, kind: str) -> None:
    name = next((n for n in members if n.startswith(prefix)), None)
    if name is None:
        raise ValueError(f"corruption {kind} needs {prefix} media; {key} has none")
    members[name] = data


_MEDIA_DEFECTS = {  # kind -> (member prefix, new bytes from the old)
    "truncated_image": ("image", lambda old: old[: len(old) // 2]),
    "garbage_audio": ("audio", lambda old: np.random.default_rng(len(old)).bytes(len(old))),
    "nan_audio": ("audio", lambda old: _float_wav(np.full(1600, np.nan))),
    "inf_audio": ("audio", lambda old: _float_wav(np.r_[np.zeros(800), np.inf, np.zeros(799)])),
    "zero_frames_audio": ("audio", lambda old: _float_wav(np.zeros(0))),
    "empty_image": ("image", lambda old: b""),
    "bomb_image": ("image", lambda old: _png_header_only(100_000, 100_000)),
    "bmp_image": ("image", lambda old: _bmp(old)),
    "huge_image": ("image", lambda old: huge_png()),
}


def _bmp(old: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(old)).convert("RGB").save(buffer, format="BMP")
    return buffer.getvalue()


def _corrupt(kind: str, sample: dict) -> dict[str, bytes]:
    """The members of ``sample`` with one deliberate defect."""
    members = {image_member(i, ext): data for i, (ext, data) in enumerate(sample["images"])}
    members |= {audio_member(i, ext): data for i, (ext, data) in enumerate(sample["audios"])}
    record = {"task": sample["task"], "messages": sample["messages"], "images": [
        image_member(i, ext) for i, (ext, _) in enumerate(sample["images"])], "audios": [
        audio_member(i, ext) for i, (ext, _) in enumerate(sample["audios"])]}
    if kind in _MEDIA_DEFECTS:
        prefix, change = _MEDIA_DEFECTS[kind]
        name = next((n for n in members if n.startswith(prefix)), "")
        _replace_media(members, prefix, change(members.get(name, b"")), sample["key"], kind)
    elif kind == "missing_field":
        del record["messages"]
    elif kind == "wrong_types":
        record = {"task": 5, "messages": [{"role": 1, "content": ["x"]}], "images": "image0"}
    elif kind == "huge_json":
        record["extra"] = "x" * 2_000_000
    elif kind not in ("bad_json", "json_array", "deep_json"):
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    text = json.dumps([record] if kind == "json_array" else record)
    if kind == "deep_json":  # 1000 levels: more than Python's json module can even parse
        text = text[:-1] + ', "extra": ' + "[" * 1000 + "]" * 1000 + "}"
    members["json"] = (text[: len(text) // 2] if kind == "bad_json" else text).encode()
    return members


def write_synthetic_shards(pattern: str | Path, num_samples: int, samples_per_shard: int = 64,
                           seed: int = 0, corrupt: Mapping[int, str] | None = None,
                           **sample_options) -> list[Path]:
    """Write ``num_samples`` synthetic samples; ``corrupt`` maps sample index -> corruption kind.

    A corruption needing media the sample lacks (e.g. ``garbage_audio`` on a captioning sample)
    raises: choose indices by layout (``index % 5``: captioning, text_to_image, asr, tts,
    spoken_vqa).
    """
    rng = np.random.default_rng(seed)
    corrupt = dict(corrupt or {})
    with ShardWriter(pattern, max_samples=samples_per_shard) as writer:
        for index in range(num_samples):
            sample = synthetic_sample(rng, index, **sample_options)
            if index in corrupt:
                writer.write_members(sample["key"], _corrupt(corrupt[index], sample))
            else:
                writer.write(**sample)
    return writer.shards
