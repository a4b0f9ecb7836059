"""Build the demo dataset: WebDataset shards per task and the curriculum's ``mixture.yaml``.

Samples are made in worker processes (each sample is seeded by ``(seed, task, index)``) and
written in a fixed order in the shard format of :mod:`omnidiff.data.media.shards` (with DALI indexes),
so a seed always gives the same samples (for a given speech backend, which is recorded in
``mixture.yaml``).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from omnidiff.data.demo.speech import Backend, Synthesizer, make_synthesizer
from omnidiff.data.demo.tasks import DemoSample, make_sample
from omnidiff.data.tokens.sequences import TASKS
from omnidiff.data.media.shards import ShardWriter

# Share of each task in the dataset (sums to 1).
TASK_SHARES = {"captioning": 0.16, "vqa": 0.14, "text_to_image": 0.18, "asr": 0.12, "tts": 0.12,
               "speech_to_image": 0.10, "spoken_vqa": 0.10, "text": 0.08}

# REFERENCE §4: stage 1 pre-aligns vision and language, stage 2 adds speech, stage 3 trains
# speech-driven visual interaction on a mix that keeps earlier tasks. The shares favour the tasks
# that need grounding (captioning, text-to-image, ASR, TTS): on a laptop's step budget a tiny
# model learns the words of a caption long before it learns to look at the image.
STAGE_RATIOS = {
    "stage1": {"text_to_image": 0.35, "captioning": 0.4, "vqa": 0.2, "text": 0.05},
    "stage2": {"text_to_image": 0.15, "captioning": 0.15, "vqa": 0.05, "text": 0.05, "asr": 0.3,
               "tts": 0.3},
    "stage3": {"spoken_vqa": 0.25, "speech_to_image": 0.25, "text_to_image": 0.1,
               "captioning": 0.1, "vqa": 0.05, "asr": 0.1, "tts": 0.1, "text": 0.05},
}

_worker_synth: Synthesizer | None = None


@dataclass
class DemoSummary:
    """What a build wrote (the command prints it)."""

    counts: dict[str, int]
    shards: dict[str, list[str]]
    bytes: int
    seconds: float
    speech_backend: str
    mixture: Path


def task_counts(total: int) -> dict[str, int]:
    """Samples per task, summing to ``total`` (largest remainders); every task gets at least one."""
    if total < len(TASKS):
        raise ValueError(f"need at least {len(TASKS)} samples (one per task), got {total}")
    exact = {task: total * TASK_SHARES[task] for task in TASKS}
    counts = {task: max(1, int(value)) for task, value in exact.items()}
    by_remainder = sorted(TASKS, key=lambda task: counts[task] - exact[task])
    for task in itertools.islice(itertools.cycle(by_remainder), total - sum(counts.values())):
        counts[task] += 1
    return counts


def _init_worker(synth: Synthesizer) -> None:
    global _worker_synth
    _worker_synth = synth


def _make(job: tuple[str, int, int, int]) -> DemoSample:
    task, index, seed, image_size = job
    return make_sample(task, index, seed, _worker_synth, image_size)


def build_demo_dataset(out_dir: str | Path, samples: int = 3000, seed: int = 0,
                       speech: Backend = "auto", image_size: int = 256, shard_size: int = 200,
                       workers: int | None = None, progress: bool = True) -> DemoSummary:
    """Write ``{task}-NNNNNN.tar`` shards and ``mixture.yaml`` into ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = task_counts(samples)
    synth = make_synthesizer(speech)  # fail here, in the caller, if there is no backend
    jobs = [(task, i, seed, image_size) for task in TASKS for i in range(counts[task])]
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1:
        _init_worker(synth)
        pool, made = None, map(_make, jobs)
    else:
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (synth,))
        made = pool.imap(_make, jobs, chunksize=4)
    shards: dict[str, list[Path]] = {}
    try:
        stream = tqdm(made, total=len(jobs), desc="demo data", unit="sample", disable=not progress)
        for task, group in itertools.groupby(stream, key=lambda sample: sample.task):
            with ShardWriter(out_dir / f"{task}-%06d.tar", max_samples=shard_size) as writer:
                for sample in group:
                    writer.write(sample.key, task, sample.messages, sample.images,
                                 sample.audios, source=sample.source)
            shards[task] = writer.shards
    finally:
        if pool:
            pool.terminate()
            pool.join()
    shard_names = {task: [path.name for path in paths] for task, paths in shards.items()}
    mixture = _write_mixture(out_dir, counts, shard_names, seed, synth.name, image_size)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    return DemoSummary(counts, shard_names, size, time.perf_counter() - start, synth.name, mixture)


def _write_mixture(out_dir: Path, counts: dict[str, int], shards: dict[str, list[str]], seed: int,
                   speech_backend: str, image_size: int) -> Path:
    """``mixture.yaml`` in the schema of :mod:`omnidiff.data.streams.mixture`; facts go in the header."""
    header = [
        "# Demo dataset mixtures: a ratio per source for each curriculum stage (REFERENCE §4).",
        f"# Built with seed {seed}; speech by {speech_backend} (16 kHz mono FLAC); "
        f"images {image_size} px.",
        "# Samples: " + ", ".join(f"{task} {n}" for task, n in counts.items()) + ".",
    ]
    document = {"sources": {task: {"shards": shards[task]} for task in TASKS},
                "stages": STAGE_RATIOS}
    path = out_dir / "mixture.yaml"
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(document, sort_keys=False))
    return path
