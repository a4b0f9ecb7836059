"""The media reader: shards -> decoded samples (torch tensors + keys + records), resumable, robust.

Per reader batch: the DALI reader pipeline yields raw members; every sample is screened
(:func:`screen_sample`: JSON, record fields, members present, media headers, limits); the media
of the survivors go through the DALI image and audio decode stages, which isolate anything DALI
cannot decode (truncated JPEG, ...). A rejected sample is skipped, counted per reason
(:meth:`MediaReader.metrics`) and logged with its shard and key; it never stops the stream.
Skipping means a batch may hold fewer than ``batch_size`` samples (never zero).

Memory stays bounded whatever a shard holds: media are decoded in slices of at most
``decode_budget_pixels`` pixels and ``decode_budget_audio_seconds`` seconds (one item over the
budget goes alone; the per-sample limits cap it), and decoded audio must be finite before any
batch-level work sees it.

Resume: :meth:`state_dict` holds the DALI reader checkpoint plus the counters; a reader built
with that state yields exactly the batches the original would have yielded next.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from omnidiff import UserError
from omnidiff.data.media import dali as pipelines
from omnidiff.data.media.validation import (
    REASONS, SampleLimits, SampleRejected, ScreenedSample, screen_sample)
from omnidiff.data.media.shards import (
    IMAGE_PLACEHOLDER, SampleRecord, ShardError, list_shards, sample_key)

logger = logging.getLogger(__name__)


class MediaReaderError(UserError, RuntimeError):
    """The stream cannot continue: a state from a different set-up, or no valid sample at all."""


class MediaReaderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(min_length=1)  # paths, brace ranges or globs
    batch_size: int = Field(8, gt=0)
    image_size: int = Field(512, gt=0)  # input images (system / user turns): 1024 codes
    generated_image_size: int = Field(256, gt=0)  # images an assistant turn generates: 256 codes
    sample_rate: int = Field(16_000, gt=0)
    n_mels: int = Field(80, ge=0)  # 0: waveform only
    mel_window: int = Field(400, gt=0)  # 25 ms at 16 kHz
    mel_hop: int = Field(160, gt=0)  # 10 ms at 16 kHz
    limits: SampleLimits = Field(default_factory=SampleLimits)
    # Decoded media per decode call, whatever the shard holds: bounds the reader's memory.
    decode_budget_pixels: int = Field(64_000_000, gt=0)
    decode_budget_audio_seconds: float = Field(600.0, gt=0)
    skip_bad_shards: bool = False  # leave unreadable shards out (counted) instead of refusing
    shuffle: bool = True
    shuffle_buffer: int = Field(1024, gt=0)
    seed: int = 0
    num_threads: int = Field(2, gt=0)
    prefetch: int = Field(2, gt=0)
    device: Literal["auto", "cpu", "gpu"] = "auto"


@dataclass
class MediaSample:
    key: str
    shard: str
    record: SampleRecord
    images: list[torch.Tensor]  # [3, S, S] float32 in [-1, 1], in placeholder order
    audios: list[torch.Tensor]  # [n] float32 mono at sample_rate, in placeholder order
    mels: list[torch.Tensor]  # [n_mels, frames] log-mel dB per audio (empty if n_mels == 0)


@dataclass
class MediaBatch:
    samples: list[MediaSample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        return [sample.key for sample in self.samples]


def _bytes(tensor) -> np.ndarray:
    return np.array(tensor, dtype=np.uint8)


class MediaReader:
    """Endless :class:`MediaBatch` stream of data-parallel rank ``shard_id`` of ``num_shards``."""

    def __init__(self, config: MediaReaderConfig, shard_id: int = 0, num_shards: int = 1,
                 state: dict[str, Any] | None = None) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} must be in [0, num_shards={num_shards})")
        self.config, self.shard_id, self.num_shards = config, shard_id, num_shards
        self.bad_shards: list[str] = []
        infos = list_shards(config.shards, self.bad_shards if config.skip_bad_shards else None)
        self._paths = [str(info.path) for info in infos]
        with_index = all(info.index_path for info in infos)
        self._index_paths = [str(info.index_path) for info in infos] if with_index else None
        use_gpu = config.device == "gpu" or (config.device == "auto" and torch.cuda.is_available())
        if use_gpu and not torch.cuda.is_available():
            raise MediaReaderError("device: gpu requested but no CUDA device is visible")
        device_id = torch.cuda.current_device() if use_gpu else None
        self.device = torch.device("cuda", device_id) if use_gpu else torch.device("cpu")
        limits = config.limits
        self._images = pipelines.DecodeStage(lambda: pipelines.image_pipeline(
            max(1, config.batch_size * limits.max_images), device_id, config.num_threads),
            self.device)
        self._audio = pipelines.DecodeStage(lambda: pipelines.audio_pipeline(
            max(1, config.batch_size * limits.max_audios), device_id, config.sample_rate,
            config.n_mels, config.mel_window, config.mel_hop, config.num_threads), self.device)
        self.skipped: Counter[str] = Counter({reason: 0 for reason in REASONS})
        self.skipped_samples: set[str] = set()  # distinct "shard:key" ever skipped (all epochs)
        self.samples_read = 0
        self.samples_ok = 0
        self._bad_streak = 0
        self._unnamed = 0  # samples DALI cannot name (no member it knows), this epoch
        if state is None:
            self._open(None)
        else:
            self.load_state_dict(state)

    # --- state ------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"shards": self._paths, "shard_id": self.shard_id, "num_shards": self.num_shards,
                "batch_size": c.batch_size, "shuffle": c.shuffle, "seed": c.seed,
                "shuffle_buffer": c.shuffle_buffer, "slots": [c.limits.max_images,
                                                             c.limits.max_audios]}

    def _open(self, checkpoint: bytes | None) -> None:
        c = self.config
        try:
            self._pipe = pipelines.reader_pipeline(
                self._paths, self._index_paths, c.limits.max_images, c.limits.max_audios,
                c.batch_size, self.shard_id, self.num_shards, c.shuffle, c.seed + self.shard_id,
                c.shuffle_buffer, c.num_threads, c.prefetch, checkpoint)
        except RuntimeError as err:  # list_shards checked every shard; this is DALI's own view
            raise ShardError(f"shards {self._paths}: DALI cannot read them "
                             f"({pipelines.dali_error_summary(err)})") from None
        total = self._pipe.reader_meta(pipelines.READER_NAME)["epoch_size"]
        # DALI gives rank i the contiguous slice [N i / n, N (i + 1) / n) of the sample stream
        self.epoch_size = (total * (self.shard_id + 1) // self.num_shards
                           - total * self.shard_id // self.num_shards)

    def state_dict(self) -> dict[str, Any]:
        """Picklable resume state: DALI reader checkpoint (bytes), counters, set-up fingerprint."""
        return {"reader": self._pipe.checkpoint(), "fingerprint": self._fingerprint(),
                "skipped": dict(self.skipped), "skipped_samples": sorted(self.skipped_samples),
                "samples_read": self.samples_read,
                "samples_ok": self.samples_ok, "unnamed": self._unnamed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        differ = [k for k in mine if state["fingerprint"].get(k) != mine[k]]
        if differ:
            raise MediaReaderError(f"reader state was saved with different {', '.join(differ)}; "
                                   "it cannot resume this reader")
        self._open(state["reader"])
        self.skipped = Counter(state["skipped"])
        self.skipped_samples = set(state["skipped_samples"])
        self.samples_read, self.samples_ok = state["samples_read"], state["samples_ok"]
        self._unnamed = state.get("unnamed", 0)

    def metrics(self) -> dict[str, int]:
        """Cumulative counters, e.g. for ``data/...`` scalars in the run's tracker.

        ``skipped_total`` and ``skipped/<reason>`` count skip events (a bad sample is skipped
        again in every epoch); ``skipped_samples`` counts distinct bad samples.
        """
        return {"samples_read": self.samples_read, "samples_ok": self.samples_ok,
                "shards_skipped": len(self.bad_shards),
                "skipped_total": sum(self.skipped.values()),
                "skipped_samples": len(self.skipped_samples),
                **{f"skipped/{reason}": self.skipped[reason] for reason in REASONS}}

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> MediaReader:
        return self

    def __next__(self) -> MediaBatch:
        while True:
            samples = self._read_batch()
            if samples:
                self._bad_streak = 0
                return MediaBatch(samples)
            if self._bad_streak >= max(self.epoch_size, 1):
                raise MediaReaderError(
                    f"no valid sample among {self._bad_streak} consecutive samples (a full pass "
                    f"over data-parallel part {self.shard_id} of {self.num_shards}, "
                    f"{len(self._paths)} tar shards); "
                    f"skipped so far: {dict(+self.skipped)}")

    def reject(self, key: str, shard: str, reason: str, detail: str) -> None:
        """Skip, count and log one sample (also for stages after decoding, e.g. tokenising)."""
        self.skipped[reason] += 1
        self.skipped_samples.add(f"{shard}:{key}")
        logger.warning("skipped sample %s in shard %s: %s (%s)", key, shard, reason, detail)

    def _read_batch(self) -> list[MediaSample]:
        outputs = self._pipe.run()
        slots = len(outputs) // 2
        n_images, n_audios = self.config.limits.max_images, self.config.limits.max_audios
        screened: list[tuple[str, str, ScreenedSample]] = []
        for i in range(len(outputs[0])):
            members = [_bytes(outputs[j][i]) for j in range(slots)]
            source = next((bytes(_bytes(outputs[slots + j][i])).decode()
                           for j in range(slots) if len(members[j])), None)
            if self.samples_read % max(self.epoch_size, 1) == 0:
                self._unnamed = 0  # a new epoch: the same unnamed samples again
            self.samples_read += 1
            if source is None:  # no member with a known extension: DALI has no name for it
                shard, key = "?", f"<unnamed sample #{self._unnamed} of this epoch>"
                self._unnamed += 1
            else:
                shard, _, member = source.rsplit(":", 2)
                key = sample_key(member)
            try:
                image_slots = members[1:1 + n_images]
                audio_slots = members[1 + n_images:1 + n_images + n_audios]
                screened.append((key, shard, screen_sample(members[0], image_slots, audio_slots,
                                                           self.config.limits)))
            except SampleRejected as rejected:
                self._bad_streak += 1
                self.reject(key, shard, rejected.reason, rejected.detail)
        images, audios = self._decode(screened)
        samples = []
        for (key, shard, item), item_images, item_audios in zip(screened, images, audios):
            failure = next(((reason, f) for reason, decoded in (("bad_image", item_images),
                                                                ("bad_audio", item_audios))
                            for f in decoded if isinstance(f, str)), None)
            failure = failure or _non_finite(item_audios)
            if failure:
                self._bad_streak += 1
                self.reject(key, shard, failure[0], failure[1])
                continue
            samples.append(MediaSample(
                key, shard, item.record, images=[out[0] for out in item_images],
                audios=[out[0] for out in item_audios],
                mels=[out[1] for out in item_audios] if self.config.n_mels else []))
        self.samples_ok += len(samples)
        return samples

    def _decode(self, screened: list[tuple[str, str, ScreenedSample]]):
        """Run both decode stages over all media of the batch; regroup results per sample."""
        c = self.config
        encoded_images, sizes, encoded_audios = [], [], []
        for _, _, item in screened:
            roles = item.record.media_roles(IMAGE_PLACEHOLDER)
            encoded_images += item.images
            sizes += [np.float32(c.generated_image_size if role == "assistant" else c.image_size)
                      for role in roles]
            encoded_audios += item.audios
        pixels = [n for _, _, item in screened for n in item.image_pixels]
        seconds = [s for _, _, item in screened for s in item.audio_seconds]
        image_out = [out for part in _budget_slices(pixels, c.decode_budget_pixels)
                     for out in self._images.run({"encoded": encoded_images[part],
                                                  "size": sizes[part]})]
        audio_out = [out for part in _budget_slices(seconds, c.decode_budget_audio_seconds)
                     for out in self._audio.run({"encoded": encoded_audios[part]})]
        image_iter, audio_iter = iter(image_out), iter(audio_out)
        images = [[_described(next(image_iter), "image", k) for k in range(len(item.images))]
                  for _, _, item in screened]
        audios = [[_described(next(audio_iter), "audio", k) for k in range(len(item.audios))]
                  for _, _, item in screened]
        return images, audios


def _budget_slices(costs: list[float], budget: float) -> list[slice]:
    """Consecutive slices of ``costs`` summing to at most ``budget`` (an item over it alone)."""
    slices, start, total = [], 0, 0.0
    for index, cost in enumerate(costs):
        if index > start and total + cost > budget:
            slices.append(slice(start, index))
            start, total = index, 0.0
        total += cost
    if start < len(costs):
        slices.append(slice(start, len(costs)))
    return slices


def _non_finite(decoded_audios) -> tuple[str, str] | None:
    """A decoded clip holding NaN or infinite samples, as a rejection."""
    for index, outputs in enumerate(decoded_audios):
        if not bool(torch.isfinite(outputs[0]).all()):
            return "bad_audio", f"audio{index}: NaN or infinite samples"
    return None


def _described(result, kind: str, index: int):
    """Name the member in a decode error; pass decoded tensors through."""
    return f"{kind}{index}: DALI cannot decode it ({result})" if isinstance(result, str) else result
