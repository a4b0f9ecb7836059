"""DALI pipelines for media shards: a checkpointable reader and stateless decode stages.

Why two kinds of pipeline: a DALI operator that fails on one sample fails the whole batch and
leaves the pipeline object unusable, and rebuilding a pipeline that holds the reader would lose
its position. So the *reader* pipeline (``fn.readers.webdataset``, sharded by data-parallel rank,
shuffled, ``enable_checkpointing=True``) only reads bytes and never decodes: nothing in a sample's
content can fail it, and its checkpoint is the exact resume point. The *decode* pipelines
(image, audio) are stateless and fed through ``external_source``; :class:`DecodeStage` runs them
and, when a batch fails, discards the pipeline and bisects the batch to isolate the items that
DALI cannot decode, so every good item is still decoded by DALI and every bad one is named.

Devices: with a GPU, images decode with nvJPEG (``device="mixed"``) and resize on the GPU, audio
decodes on the CPU (DALI's only audio decoder) and its mel features run on the GPU. Without one
(``device_id=None``) everything runs on the CPU. ``reference.py`` holds the plain equivalent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

from omnidiff.data.media.dali_reference import LOG_FLOOR_DB
from omnidiff.data.media.shards import JSON_EXT, slot_extensions

READER_NAME = "shards"


@pipeline_def(enable_checkpointing=True)
def _reader(paths, index_paths, num_images, num_audios, shard_id, num_shards, shuffle, seed,
            initial_fill):
    ext = [JSON_EXT, *(slot_extensions("image", i) for i in range(num_images)),
           *(slot_extensions("audio", i) for i in range(num_audios))]
    outputs = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=ext, name=READER_NAME,
        missing_component_behavior="empty", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=shuffle, seed=seed, initial_fill=initial_fill)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return (*outputs, *(fn.get_property(out, key="source_info") for out in outputs))


def reader_pipeline(paths: Sequence[str], index_paths: Sequence[str] | None, num_images: int,
                    num_audios: int, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                    shuffle: bool = True, seed: int = 0, initial_fill: int = 1024,
                    num_threads: int = 2, prefetch: int = 2,
                    checkpoint: bytes | str | None = None) -> Pipeline:
    """Reads raw members: outputs ``json, image0.., audio0..`` then their ``source_info`` strings.

    ``checkpoint`` (from ``Pipeline.checkpoint()``) restores the exact reading position.
    """
    pipe = _reader(list(paths), list(index_paths) if index_paths else None, num_images, num_audios,
                   shard_id, num_shards, shuffle, seed, initial_fill, batch_size=batch_size,
                   num_threads=num_threads, device_id=None, prefetch_queue_depth=prefetch,
                   checkpoint=checkpoint)
    pipe.build()
    return pipe


@pipeline_def(prefetch_queue_depth=1)
def _images(gpu: bool):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=0)
    image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    image = fn.resize(image, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True,
                      subpixel_scale=False)
    return fn.crop_mirror_normalize(image, crop_h=size, crop_w=size, mean=127.5, std=127.5,
                                    output_layout="CHW", dtype=types.FLOAT)


def image_pipeline(max_batch: int, device_id: int | None, num_threads: int = 2) -> Pipeline:
    """Inputs ``encoded`` (bytes) and ``size`` (per image); output CHW float32 in [-1, 1]."""
    return _images(device_id is not None, batch_size=max_batch, num_threads=num_threads,
                   device_id=device_id)


@pipeline_def(prefetch_queue_depth=1)
def _audio(gpu: bool, sample_rate: int, n_mels: int, window: int, hop: int):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    wave, _ = fn.decoders.audio(encoded, sample_rate=sample_rate, downmix=True,
                                dtype=types.FLOAT)
    if gpu:
        wave = wave.gpu()
    if not n_mels:
        return wave
    spectrum = fn.spectrogram(wave, nfft=window, window_length=window, window_step=hop)
    mel = fn.mel_filter_bank(spectrum, sample_rate=sample_rate, nfilter=n_mels)
    return wave, fn.to_decibels(mel, multiplier=10.0, reference=1.0, cutoff_db=LOG_FLOOR_DB)


def audio_pipeline(max_batch: int, device_id: int | None, sample_rate: int, n_mels: int,
                   window: int, hop: int, num_threads: int = 2) -> Pipeline:
    """Input ``encoded``; outputs the mono waveform at ``sample_rate`` (+ log-mel if ``n_mels``)."""
    return _audio(device_id is not None, sample_rate, n_mels, window, hop, batch_size=max_batch,
                  num_threads=num_threads, device_id=device_id)


def to_torch(tensor: Any, device: torch.device) -> torch.Tensor:
    """Copy one DALI tensor (CPU or GPU) into a new torch tensor on ``device``."""
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if out.is_cuda else None
    return feed_ndarray(tensor, out, cuda_stream=stream)


def dali_error_summary(err: Exception) -> str:
    """The operator's own message from a DALI pipeline error (which repeats a traceback)."""
    text = str(err).split("encountered:")[-1].split("Current pipeline object")[0]
    return " ".join(text.split()) or type(err).__name__


class DecodeStage:
    """Runs a stateless decode pipeline on explicit item lists; isolates undecodable items.

    ``run(inputs)`` takes equal-length lists per ``external_source`` name and returns, per item,
    a tuple of torch tensors (the pipeline's outputs) or an error string.
    """

    def __init__(self, factory: Callable[[], Pipeline], device: torch.device) -> None:
        self._factory = factory
        self._device = device
        self._pipe: Pipeline | None = None
        self.rebuilds = 0

    def run(self, inputs: dict[str, list[np.ndarray]]) -> list[tuple[torch.Tensor, ...] | str]:
        count = len(next(iter(inputs.values())))
        if count == 0:
            return []
        try:
            return self._run_batch(inputs, count)
        except RuntimeError as err:
            self._pipe = None  # DALI leaves a failed pipeline unusable: rebuild on next use
            self.rebuilds += 1
            if count == 1:
                return [dali_error_summary(err)]
        half = count // 2
        return (self.run({k: v[:half] for k, v in inputs.items()})
                + self.run({k: v[half:] for k, v in inputs.items()}))

    def _run_batch(self, inputs: dict[str, list[np.ndarray]], count: int):
        if self._pipe is None:
            self._pipe = self._factory()
            self._pipe.build()
        for name, values in inputs.items():
            self._pipe.feed_input(name, values)
        outputs = self._pipe.run()
        return [tuple(to_torch(out[i], self._device) for out in outputs) for i in range(count)]
