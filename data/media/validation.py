"""Reader-side validation of samples and shards.

:func:`screen_sample` is the cheap check every sample passes before any decoder sees it: the JSON
parses, the record is valid (fields present, placeholders match the media lists), every named
member is present, media headers parse (PIL / libsndfile read only the header), and the sample
is within :class:`SampleLimits`. It rejects with a :class:`SampleRejected` carrying one of
:data:`REASONS`. Truncated media pass the header check; the decoder catches those.

:func:`validate_shard` is the offline check of a whole shard: it screens every sample and then
fully decodes its media with the reference decoders, returning every rejection.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnidiff.data.media import dali_reference as reference
from omnidiff.data.media.shards import (
    AUDIO_EXTS, IMAGE_EXTS, JSON_EXT, SampleRecord, audio_member, image_member, inspect_shard)

REASONS = ("bad_json", "bad_record", "missing_media", "too_long", "bad_image", "bad_audio",
           "bad_sequence")
_PIL_FORMATS = {"JPEG", "PNG", "WEBP"}

Buffer = bytes | bytearray | memoryview  # numpy uint8 arrays also qualify


class SampleLimits(BaseModel):
    """What a sample may contain; anything beyond is skipped as ``too_long``."""

    model_config = ConfigDict(extra="forbid")

    max_images: int = Field(2, ge=0)
    max_audios: int = Field(2, ge=0)
    max_text_chars: int = Field(32_768, gt=0)
    max_audio_seconds: float = Field(60.0, gt=0)
    max_image_pixels: int = Field(64_000_000, gt=0)
    max_json_bytes: int = Field(1_000_000, gt=0)
    max_json_depth: int = Field(32, gt=0)


class SampleRejected(Exception):
    """Why one sample is skipped: ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class ScreenedSample:
    record: SampleRecord
    images: list[Buffer]  # encoded, in placeholder order
    audios: list[Buffer]
    image_pixels: list[int] = field(default_factory=list)  # from the headers
    audio_seconds: list[float] = field(default_factory=list)


def json_depth(value: object) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion limit to hit)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, level)
            stack.extend((child, level + 1)
                         for child in (node.values() if isinstance(node, dict) else node))
    return depth


def _parse_record(data: Buffer, limits: SampleLimits) -> SampleRecord:
    if not len(data):
        raise SampleRejected("bad_json", "no .json member")
    if len(data) > limits.max_json_bytes:
        raise SampleRejected("too_long", f"{len(data)} bytes of JSON, at most "
                                         f"{limits.max_json_bytes} allowed")
    try:
        raw = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleRejected("bad_json", f"not JSON ({err})") from None
    except RecursionError:
        raise SampleRejected("bad_json", "nested too deeply to parse") from None
    if not isinstance(raw, dict):
        raise SampleRejected("bad_json", f"JSON is a {type(raw).__name__}, not an object")
    if json_depth(raw) > limits.max_json_depth:
        raise SampleRejected("bad_json", f"nested deeper than {limits.max_json_depth} levels")
    try:
        return SampleRecord.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors())
        raise SampleRejected("bad_record", problems) from None


def _check_image(index: int, data: Buffer, limits: SampleLimits) -> int:
    """Header checks; returns the image's pixel count."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
    except Exception as err:  # PIL raises many types for garbage input
        raise SampleRejected("bad_image", f"image{index}: unreadable header ({err})") from None
    if fmt not in _PIL_FORMATS:
        raise SampleRejected("bad_image", f"image{index}: format {fmt} is not one of {IMAGE_EXTS}")
    if width < 1 or height < 1:
        raise SampleRejected("bad_image", f"image{index}: empty ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise SampleRejected("too_long", f"image{index}: {width}x{height} exceeds "
                                         f"{limits.max_image_pixels} pixels")
    return width * height


def _check_audio(index: int, data: Buffer, limits: SampleLimits) -> float:
    """Header checks; returns the clip's duration in seconds."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:  # libsndfile errors surface as several exception types
        reason = str(err).rsplit(": ", 1)[-1]  # drop libsndfile's "Error opening <BytesIO ...>"
        raise SampleRejected("bad_audio", f"audio{index}: unreadable header ({reason})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise SampleRejected("bad_audio", f"audio{index}: no audio frames")
    if info.frames / info.samplerate > limits.max_audio_seconds:
        raise SampleRejected("too_long", f"audio{index}: {info.frames / info.samplerate:.1f} s "
                                         f"exceeds {limits.max_audio_seconds} s")
    return info.frames / info.samplerate


def screen_sample(json_data: Buffer, image_slots: Sequence[Buffer], audio_slots: Sequence[Buffer],
                  limits: SampleLimits) -> ScreenedSample:
    """Cheap checks of one sample; ``*_slots[i]`` is member ``image{i}`` / ``audio{i}`` (empty
    if absent)."""
    record = _parse_record(json_data, limits)
    for kind, names, limit in (("images", record.images, limits.max_images),
                               ("audios", record.audios, limits.max_audios)):
        if len(names) > limit:
            raise SampleRejected("too_long", f"{len(names)} {kind}, at most {limit} allowed")
    if record.text_length() > limits.max_text_chars:
        raise SampleRejected("too_long", f"{record.text_length()} text characters, at most "
                                         f"{limits.max_text_chars} allowed")
    images = [image_slots[i] for i in range(len(record.images))]
    audios = [audio_slots[i] for i in range(len(record.audios))]
    for names, slots in ((record.images, images), (record.audios, audios)):
        missing = [name for name, data in zip(names, slots) if not len(data)]
        if missing:
            raise SampleRejected("missing_media", f"record names {missing}, absent from the sample")
    pixels = [_check_image(index, data, limits) for index, data in enumerate(images)]
    seconds = [_check_audio(index, data, limits) for index, data in enumerate(audios)]
    return ScreenedSample(record, images, audios, pixels, seconds)


# --- whole shards ---------------------------------------------------------------------------------
@dataclass
class Rejection:
    key: str
    reason: str
    detail: str


@dataclass
class ShardReport:
    path: Path
    num_samples: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def num_good(self) -> int:
        return self.num_samples - len(self.rejections)


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members as DALI's reader does."""
    key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name = member.name
            base = name.rsplit("/", 1)[-1]
            if not member.isfile() or base.startswith("."):
                continue
            dot = name.find(".", len(name) - len(base))
            this_key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
            if this_key != key and key is not None:
                yield key, members
                members = {}
            key = this_key
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _slot(members: dict[str, bytes], index: int, exts: Sequence[str], name) -> bytes:
    return next((members[name(index, ext)] for ext in exts if name(index, ext) in members), b"")


def validate_shard(path: str | Path, limits: SampleLimits | None = None) -> ShardReport:
    """Screen and fully decode every sample of a shard; an unreadable shard raises ShardError."""
    limits = limits or SampleLimits()
    report = ShardReport(inspect_shard(path).path)
    for key, members in _samples(report.path):
        report.num_samples += 1
        try:
            images = [_slot(members, i, IMAGE_EXTS, image_member) for i in range(limits.max_images)]
            audios = [_slot(members, i, AUDIO_EXTS, audio_member) for i in range(limits.max_audios)]
            sample = screen_sample(members.get(JSON_EXT, b""), images, audios, limits)
            _decode_all(sample)
        except SampleRejected as rejected:
            report.rejections.append(Rejection(key, rejected.reason, rejected.detail))
    return report


def _decode_all(sample: ScreenedSample) -> None:
    for index, data in enumerate(sample.images):
        try:
            reference.decode_image(bytes(data))
        except Exception as err:
            raise SampleRejected("bad_image", f"image{index}: cannot decode ({err})") from None
    for index, data in enumerate(sample.audios):
        try:
            reference.decode_audio(bytes(data))
        except Exception as err:
            raise SampleRejected("bad_audio", f"audio{index}: cannot decode ({err})") from None

