"""From a sample source to packed micro-batches, with exact resume.

``source -> transform (e.g. tail pads) -> greedy packer -> micro-batches``. The whole chain's
position (the source's state, the packer's open row and the transform's RNG) is one
``state_dict``, saved with checkpoints, so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from omnidiff.data.packing import PackedBatch, SequencePacker, TokenSample, collate_rows
from omnidiff.data.synthetic import SyntheticMultimodal


class SampleSource(Protocol):
    """An endless, resumable stream of token samples."""

    def __next__(self) -> TokenSample: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SyntheticSource:
    """Samples ``start, start + step, ...`` of a :class:`SyntheticMultimodal` world."""

    def __init__(self, dataset: SyntheticMultimodal, start: int = 0, step: int = 1) -> None:
        self.dataset = dataset
        self.index = start
        self.step = step

    def __next__(self) -> TokenSample:
        sample = self.dataset.sample(self.index)
        self.index += self.step
        return sample

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


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
