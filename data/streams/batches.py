"""From a sample source to noised micro-batches, with exact resume.

``source -> transform (tail pads) -> greedy packer -> micro-batches -> noising``. The whole
chain's position (the source's state, the packer's open row and the transform's RNG) is one
``state_dict``, saved with checkpoints; the noise of a micro-batch is seeded by (run seed, step,
micro-batch, DP rank). So a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from omnidiff.data.config import DataConfig, DiffusionConfig
from omnidiff.data.tokens.noising import NoisedBatch, TailPadder, noise_batch
from omnidiff.data.tokens.packing import PackedBatch, SequencePacker, TokenSample, collate_rows
from omnidiff.data.tokens.vocab import CONTEXT_OF_AUDIO, UnifiedVocab


class SampleSource(Protocol):
    """An endless, resumable stream of token samples."""

    def __next__(self) -> TokenSample: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Stateful(Protocol):
    def __call__(self, sample: TokenSample) -> TokenSample: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PackedBatchStream:
    """Endless micro-batches of ``rows`` packed rows of ``seq_length`` tokens."""

    def __init__(self, source: SampleSource, seq_length: int, pad_id: int, rows: int,
                 transform: _Stateful | Callable[[TokenSample], TokenSample] | None = None
                 ) -> None:
        self.source = source
        self.transform = transform
        self.rows = rows
        self.packer = SequencePacker(seq_length, pad_id)

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        rows = []
        while len(rows) < self.rows:
            sample = next(self.source)
            if self.transform is not None:
                sample = self.transform(sample)
            closed = self.packer.add(sample)
            if closed:
                rows.append(closed)
        return collate_rows(rows, self.packer.seq_length, self.packer.pad_id)

    def metrics(self) -> dict[str, int]:
        """``data/...`` counters: samples dropped by the packer and the source's own (skips)."""
        source = getattr(self.source, "metrics", dict)()
        return {f"data/{name}": value for name, value in
                {"oversize_skipped": self.packer.oversize_skipped, **source}.items()}

    def state_dict(self) -> dict:
        state = {"source": self.source.state_dict(), "packer": self.packer.state_dict()}
        if hasattr(self.transform, "state_dict"):
            state["transform"] = self.transform.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.packer.load_state_dict(state["packer"])
        if "transform" in state:
            self.transform.load_state_dict(state["transform"])


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, micro-batch, rank, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def batch_stream(source: SampleSource, data: DataConfig, diffusion: DiffusionConfig,
                 vocab: UnifiedVocab, seed: int, dp_rank: int = 0) -> PackedBatchStream:
    """Packed micro-batches of ``source`` (this DP rank's samples), tail-padded as configured."""
    transform = None
    if diffusion.tail_pad:
        transform = TailPadder(vocab.eos_id, diffusion.tail_pad_max, seed_for(seed, 1, dp_rank))
    return PackedBatchStream(source, data.seq_length, vocab.eos_id, data.micro_batch_size,
                             transform)


def noised_micro_batches(batches: PackedBatchStream, diffusion: DiffusionConfig,
                         vocab: UnifiedVocab, seed: int, step: int, count: int,
                         dp_rank: int = 0) -> list[NoisedBatch]:
    """The next ``count`` micro-batches, noised with seeds fixed by (seed, step, micro, rank)."""
    feature_id = vocab.special_id(CONTEXT_OF_AUDIO)
    return [noise_batch(next(batches), diffusion, vocab.mask_id,
                        torch.Generator().manual_seed(seed_for(seed, step, i, dp_rank)),
                        feature_id)
            for i in range(count)]
