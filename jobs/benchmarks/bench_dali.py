"""Samples per second: the DALI media reader vs a PIL / soundfile DataLoader baseline, same shards.

Both produce the same output from the same generated shards: images ``[3, S, S]`` float32 in
[-1, 1] (bicubic short-side resize, centre crop) and audio as a 16 kHz waveform plus an 80-bin
log-mel. The baseline is the usual torchvision-style loader (torchvision itself cannot be
installed here): ``webdataset.WebDataset`` shards split over ``DataLoader`` workers, each
decoding with PIL / soundfile / SciPy (:mod:`omnidiff.data.media.dali_reference`); DALI runs the
pipelines of :class:`omnidiff.data.media.reader.MediaReader` on the CPU with as many threads as
the baseline has workers. Each is timed from construction to its last sample (start-up included).
Image and audio workloads are measured separately, each on its own shards. The audio baseline
resamples with ``scipy.signal.resample_poly`` (exact polyphase; slow for 44.1 -> 16 kHz, ratio
160/441). ``max|diff|`` compares the first sample of both (images in [-1, 1] units, waveforms
away from their first/last 2 ms).

Run: ``python -m omnidiff.jobs.benchmarks.bench_dali`` (or this file directly).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset

from omnidiff.data.media import dali_reference as reference
from omnidiff.data.media.reader import MediaReader, MediaReaderConfig
from omnidiff.data.media.shards import ShardWriter
from omnidiff.data.media.synthetic import encode_audio, encode_image, smooth_image, tones


def write_shards(out: Path, kind: str, count: int, shards: int, args) -> list[Path]:
    rng = np.random.default_rng(0)
    with ShardWriter(out / f"{kind}-%04d.tar", max_samples=-(-count // shards)) as writer:
        for index in range(count):
            if kind == "image":
                pixels = smooth_image(rng, args.width, args.height)
                writer.write(f"s{index:06d}", "captioning", [
                    {"role": "user", "content": "Describe the image.\n<image>"},
                    {"role": "assistant", "content": "A scene."}],
                    images=[("jpg", encode_image(pixels, "jpg"))])
            else:
                rate = (22_050, 44_100, 48_000)[index % 3]
                writer.write(f"s{index:06d}", "asr", [
                    {"role": "user", "content": "Convert the speech to text.\n<speech>"},
                    {"role": "assistant", "content": "tones"}],
                    audios=[("wav", encode_audio(tones(rng, rate, args.audio_seconds), rate,
                                                 "wav"))])
    return writer.shards


class ReferenceSamples(IterableDataset):
    """The baseline: WebDataset shards split over workers, decoded with the plain references."""

    def __init__(self, shards: list[Path], size: int, sample_rate: int = 16_000) -> None:
        self.shards, self.size, self.sample_rate = [str(s) for s in shards], size, sample_rate

    def __iter__(self):
        for sample in webdataset.WebDataset(self.shards, shardshuffle=False, empty_check=False):
            record = json.loads(sample["json"])
            images = [torch.from_numpy(reference.image_to_model_input(
                reference.decode_image(sample[name]), self.size)) for name in record["images"]]
            audios, mels = [], []
            for name in record["audios"]:
                wave = reference.audio_to_model_input(sample[name], self.sample_rate)
                audios.append(torch.from_numpy(wave))
                mel = reference.log_mel(wave, self.sample_rate, 80, 400, 160)
                mels.append(torch.from_numpy(mel))
            yield {"key": sample["__key__"], "images": images, "audios": audios, "mels": mels}


def _timed(make_batches, total: int) -> tuple[float, dict]:
    """(samples per second, first sample) to deliver ``total`` samples, start-up included.

    Timing from construction keeps the comparison fair: a DataLoader's workers decode ahead while
    the first batch is awaited, so excluding a warm-up batch would credit the baseline with work
    done before the clock starts.
    """
    start = time.perf_counter()
    batches = make_batches()
    first = next(batches)
    seen = len(first)
    while seen < total:
        seen += len(next(batches))
    return seen / (time.perf_counter() - start), first[0]


def dali_batches(shards, args):
    reader = MediaReader(MediaReaderConfig(
        shards=[str(s) for s in shards], batch_size=args.batch_size, image_size=args.size,
        generated_image_size=args.size, shuffle=False, num_threads=args.workers, device="cpu"))
    for batch in reader:
        yield [{"key": s.key, "images": s.images, "audios": s.audios, "mels": s.mels}
               for s in batch.samples]


def baseline_batches(shards, args):
    return iter(DataLoader(ReferenceSamples(shards, args.size), batch_size=args.batch_size,
                           num_workers=args.workers, collate_fn=list))


def _max_difference(a: dict, b: dict) -> float:
    pairs = list(zip(a["images"] + a["audios"], b["images"] + b["audios"], strict=True))
    return max(float((x[32:-32] - y[32:-32]).abs().max() if x.ndim == 1 else (x - y).abs().max())
               for x, y in pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--audios", type=int, default=160)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--size", type=int, default=256, help="output image side")
    parser.add_argument("--audio-seconds", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# {args.workers} workers/threads, batch {args.batch_size}; images {args.width}x"
          f"{args.height} jpg -> {args.size}x{args.size}; audio {args.audio_seconds} s wav "
          f"22.05/44.1/48 kHz -> 16 kHz + 80-mel")
    print(f"{'workload':<8} {'samples':>8} {'DALI/s':>9} {'baseline/s':>11} {'ratio':>6} "
          f"{'max|diff|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, count in (("image", args.images), ("audio", args.audios)):
            shards = write_shards(Path(tmp), kind, count, 2 * args.workers, args)
            dali_rate, dali_first = _timed(lambda: dali_batches(shards, args), count)
            base_rate, base_first = _timed(lambda: baseline_batches(shards, args), count)
            if dali_first["key"] != base_first["key"]:
                raise RuntimeError(
                    f"first samples differ: {dali_first['key']} vs {base_first['key']}")
            print(f"{kind:<8} {count:>8} {dali_rate:>9.1f} {base_rate:>11.1f} "
                  f"{dali_rate / base_rate:>6.2f} {_max_difference(dali_first, base_first):>9.4f}")


if __name__ == "__main__":
    main()
