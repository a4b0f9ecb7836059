"""The media shard format: WebDataset tar shards, their writer and their listing.

One sample is a group of tar members sharing a key (WebDataset convention: the key is the member
name up to the first dot of its base name; keys contain no dots)::

    {key}.json           the record (below), UTF-8 JSON
    {key}.image0.jpg     the sample's first image (jpg, jpeg, png or webp)
    {key}.image1.png     its second image, ...
    {key}.audio0.wav     its first audio clip (wav or flac), ...

The record is Omni-Diffusion's chat layout plus the names of the media members::

    {"task": "spoken_vqa",
     "messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "<speech>\\n<image>"},
                  {"role": "assistant", "content": "A red bus.\\n<speech>"}],
     "images": ["image0.jpg"],
     "audios": ["audio0.wav", "audio1.wav"]}

Placeholders refer to the media in order of appearance over the whole conversation: the k-th
``<image>`` is ``images[k]`` = member ``image{k}.<ext>``, the k-th ``<speech>`` is ``audios[k]`` =
``audio{k}.<ext>``. Fixed member names (index in the name) let DALI's reader map every media slot
to one reader output without looking inside the JSON; the explicit lists keep the record
self-describing and let the validator cross-check record and members. Extra JSON keys are kept
as metadata.

Each shard gets a DALI index beside it (``shard-000000.tar`` -> ``shard-000000.idx``, written with
DALI's own ``wds2idx``), so readers start without scanning the tar.
"""

from __future__ import annotations

import logging
import glob
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import webdataset
from braceexpand import braceexpand
from pydantic import BaseModel, ConfigDict, Field, model_validator
from wds2idx import IndexCreator

from omnidiff import UserError

logger = logging.getLogger(__name__)
from omnidiff.data.tokens.sequences import IMAGE_PLACEHOLDER, SPEECH_PLACEHOLDER

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac")
JSON_EXT = "json"

MediaInput = str | Path | tuple[str, bytes]  # a file (extension from its suffix) or (ext, bytes)


class ShardError(UserError, ValueError):
    """A shard that cannot be read (missing, not a tar, truncated) or a bad shard pattern."""


def image_member(index: int, ext: str) -> str:
    return f"image{index}.{ext}"


def audio_member(index: int, ext: str) -> str:
    return f"audio{index}.{ext}"


def slot_extensions(kind: Literal["image", "audio"], index: int) -> str:
    """DALI ``ext`` set for one media slot, e.g. ``image0.jpg;image0.jpeg;...;image0.webp``."""
    exts, member = (IMAGE_EXTS, image_member) if kind == "image" else (AUDIO_EXTS, audio_member)
    return ";".join(member(index, ext) for ext in exts)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class SampleRecord(BaseModel):
    """The ``.json`` member of a sample."""

    model_config = ConfigDict(extra="allow")

    task: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    audios: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_media(self) -> SampleRecord:
        for kind, names, exts, member, placeholder in (
            ("images", self.images, IMAGE_EXTS, image_member, IMAGE_PLACEHOLDER),
            ("audios", self.audios, AUDIO_EXTS, audio_member, SPEECH_PLACEHOLDER),
        ):
            count = sum(m.content.count(placeholder) for m in self.messages)
            if count != len(names):
                raise ValueError(f"{count} {placeholder} placeholders but {len(names)} {kind}")
            for index, name in enumerate(names):
                if name not in {member(index, ext) for ext in exts}:
                    raise ValueError(f"{kind}[{index}] is {name!r}, expected "
                                     f"{member(index, '<ext>')} with ext in {exts}")
        return self

    def media_roles(self, placeholder: str) -> list[str]:
        """The role of the turn holding each placeholder, in media order (input vs generated)."""
        return [m.role for m in self.messages for _ in range(m.content.count(placeholder))]

    def text_length(self) -> int:
        return sum(len(m.content) for m in self.messages)


# --- writing --------------------------------------------------------------------------------------
def index_path(shard: Path) -> Path:
    return shard.with_suffix(".idx")


def write_index(shard: str | Path) -> Path:
    """Write DALI's index for a finished shard (the format ``fn.readers.webdataset`` reads)."""
    shard = Path(shard)
    with IndexCreator(str(shard), str(index_path(shard)), verbose=False) as creator:
        creator.create_index()
    return index_path(shard)


def _media_bytes(item: MediaInput, allowed: Sequence[str]) -> tuple[str, bytes]:
    if isinstance(item, tuple):
        ext, data = item
    else:
        ext, data = Path(item).suffix.lstrip("."), Path(item).read_bytes()
    ext = ext.lower()
    if ext not in allowed:
        raise ValueError(f"media extension {ext!r} is not one of {allowed}")
    return ext, bytes(data)


class ShardWriter:
    """Write samples into size-capped shards ``pattern % n`` (e.g. ``out/part-%06d.tar``).

    Thin layer over ``webdataset.ShardWriter`` that names media members, validates the record
    before anything is written, and writes each shard's DALI index when the shard closes.
    """

    def __init__(self, pattern: str | Path, max_samples: int = 1000, max_bytes: float = 1e9,
                 start_shard: int = 0, index: bool = True) -> None:
        Path(pattern).parent.mkdir(parents=True, exist_ok=True)
        self.shards: list[Path] = []
        self._index = index
        self._keys: set[str] = set()
        self._writer = webdataset.ShardWriter(str(pattern), maxcount=max_samples, maxsize=max_bytes,
                                              post=self._finished, start_shard=start_shard,
                                              verbose=0, encoder=False)

    def _finished(self, name: str) -> None:
        self.shards.append(Path(name))
        if self._index:
            write_index(name)

    def write(self, key: str, task: str, messages: Sequence[dict],
              images: Sequence[MediaInput] = (), audios: Sequence[MediaInput] = (),
              **metadata) -> None:
        """Write one sample; ``images`` / ``audios`` are in placeholder order."""
        image_data = [_media_bytes(item, IMAGE_EXTS) for item in images]
        audio_data = [_media_bytes(item, AUDIO_EXTS) for item in audios]
        members = {image_member(i, ext): data for i, (ext, data) in enumerate(image_data)}
        members |= {audio_member(i, ext): data for i, (ext, data) in enumerate(audio_data)}
        record = SampleRecord(task=task, messages=list(messages), images=[
            image_member(i, ext) for i, (ext, _) in enumerate(image_data)], audios=[
            audio_member(i, ext) for i, (ext, _) in enumerate(audio_data)], **metadata)
        members[JSON_EXT] = json.dumps(record.model_dump(), ensure_ascii=False).encode()
        self.write_members(key, members)

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Write raw members ``{ext: bytes}`` under ``key`` (converters, deliberate corruption)."""
        if not key or "." in key or key in self._keys:
            raise ValueError(f"sample key {key!r} must be non-empty, without dots, and unique")
        self._keys.add(key)
        self._writer.write({"__key__": key, **members})

    def close(self) -> list[Path]:
        self._writer.close()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- listing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    path: Path
    index_path: Path | None  # DALI index beside the shard, when present and consistent
    num_samples: int


def expand_shard_specs(specs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand brace ranges (``part-{000000..000009}.tar``) and globs; keep the given order."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    paths: list[Path] = []
    for spec in specs:
        for item in braceexpand(str(spec)):
            if glob.has_magic(item):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise ShardError(f"shard pattern {item}: matches no file")
                paths.extend(Path(m) for m in matches)
            else:
                paths.append(Path(item))
    if not paths:
        raise ShardError("no shards given")
    return paths


def sample_key(name: str) -> str:
    """WebDataset key of a member name: everything before the first dot of its base name."""
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    return name if dot < 0 else name[:dot]


def _from_index(path: Path, idx: Path, size: int) -> int | None:
    """Sample count from a DALI index, or None if the index does not fit the shard."""
    try:
        lines = idx.read_text().splitlines()
        version, count = lines[0].split()
        extent = 0
        for line in lines[1:]:
            fields = line.split()
            # v1.2 entries: ext offset size name, repeated per component
            step = 4 if version == "v1.2" else 3
            for i in range(0, len(fields), step):
                extent = max(extent, int(fields[i + 1]) + int(fields[i + 2]))
        return int(count) if int(count) == len(lines) - 1 and extent <= size else None
    except (OSError, ValueError, IndexError):
        return None


def inspect_shard(path: str | Path) -> ShardInfo:
    """Check a shard is a readable, complete tar; count its samples. Raises :class:`ShardError`."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path}: no such file")
    size = path.stat().st_size
    idx = index_path(path)
    if idx.is_file() and idx.stat().st_mtime >= path.stat().st_mtime:
        count = _from_index(path, idx, size)
        if count is not None:
            return ShardInfo(path, idx, count)
    try:
        with tarfile.open(path, "r:") as tar:  # headers only: tarfile seeks over member data
            members = tar.getmembers()
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"shard {path}: not a readable tar archive ({err})") from None
    files = [m for m in members if m.isfile()]
    if not files:
        raise ShardError(f"shard {path}: contains no files")
    block = tarfile.BLOCKSIZE
    data_end = max(m.offset_data + -(-m.size // block) * block for m in files)
    if data_end + 2 * block > size:  # POSIX: two zero blocks end every archive
        raise ShardError(f"shard {path}: truncated (no end-of-archive marker after the last "
                         "member)")
    keys = {sample_key(m.name) for m in files if not Path(m.name).name.startswith(".")}
    return ShardInfo(path, None, len(keys))


def list_shards(specs: str | Path | Iterable[str | Path],
                skipped: list[str] | None = None) -> list[ShardInfo]:
    """Expand shard specs and inspect every shard. The first unreadable one raises ShardError,
    unless ``skipped`` is given: then its reason is appended there and the shard left out (at
    least one shard must remain)."""
    infos = []
    for path in expand_shard_specs(specs):
        try:
            infos.append(inspect_shard(path))
        except ShardError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
            logger.warning("skipping %s", err)
    if not infos:
        raise ShardError(f"no readable shard among {len(skipped or [])}: {(skipped or [''])[0]}")
    return infos
