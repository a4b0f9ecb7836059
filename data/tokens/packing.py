"""Token samples and greedy packing into fixed-length rows.

A packed row holds whole samples back to back; ``segment_ids`` number them 1, 2, ... (0 marks the
unused tail) and ``position_ids`` restart at 0 for each sample, so attention can be
block-diagonal and RoPE sees every sample as if it ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from omnidiff.data.tokens.tasks import TASKS


@dataclass
class TokenSample:
    """One training sample: token ids and which of them are targets (assistant turns).

    ``speech_features`` (continuous speech input): one ``[frames, dim]`` float row per
    ``<|context_of_audio|>`` token of the sequence, in order; the model puts their projection
    in place of those tokens' embeddings.
    """

    tokens: torch.Tensor  # [n] long
    target_mask: torch.Tensor  # [n] bool: scored (and maskable) positions
    tail_pad_mask: torch.Tensor | None = None  # [n] bool: appended end-of-text targets
    task: str = ""
    speech_features: torch.Tensor | None = None  # [frames, dim] float, in sequence order

    def __post_init__(self) -> None:
        if self.tail_pad_mask is None:
            self.tail_pad_mask = torch.zeros_like(self.target_mask)
        if not (len(self.tokens) == len(self.target_mask) == len(self.tail_pad_mask)):
            raise ValueError("tokens, target_mask and tail_pad_mask must have the same length")

    def __len__(self) -> int:
        return len(self.tokens)

    def to_state(self) -> dict:
        """Plain data (tensors and a string), e.g. for a checkpoint."""
        state = {"tokens": self.tokens, "target_mask": self.target_mask,
                 "tail_pad_mask": self.tail_pad_mask, "task": self.task}
        if self.speech_features is not None:
            state["speech_features"] = self.speech_features
        return state

    @classmethod
    def from_state(cls, state: dict) -> TokenSample:
        return cls(**state)


@dataclass
class PackedBatch:
    """A micro-batch of packed rows, all tensors ``[batch, seq]``."""

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    tail_pad_mask: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    num_samples: int = 0
    task_counts: dict[str, int] = field(default_factory=dict)
    task_ids: torch.Tensor | None = None  # [batch, seq]: index in TASKS, -1 unknown / padding
    speech_features: torch.Tensor | None = None  # [frames, dim]: the rows' features, in order

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedBatch(**moved)


class SequencePacker:
    """Greedy first-fit-in-order packing of a sample stream into rows of ``seq_length``.

    A sample longer than a row is dropped and counted in ``oversize_skipped`` (never a crash).
    """

    def __init__(self, seq_length: int, pad_id: int) -> None:
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.oversize_skipped = 0
        self._open: list[TokenSample] = []
        self._open_len = 0

    def add(self, sample: TokenSample) -> list[TokenSample] | None:
        """Add a sample; return the samples of a row closed by it, if any."""
        if len(sample) > self.seq_length:
            self.oversize_skipped += 1
            return None
        closed = None
        if self._open_len + len(sample) > self.seq_length:
            closed, self._open, self._open_len = self._open, [], 0
        self._open.append(sample)
        self._open_len += len(sample)
        return closed

    def flush(self) -> list[TokenSample] | None:
        """Close the open row (end of stream)."""
        closed, self._open, self._open_len = self._open, [], 0
        return closed or None

    def state_dict(self) -> dict:
        return {"open": [sample.to_state() for sample in self._open],
                "oversize_skipped": self.oversize_skipped}

    def load_state_dict(self, state: dict) -> None:
        self._open = [TokenSample.from_state(sample) for sample in state["open"]]
        self._open_len = sum(len(s) for s in self._open)
        self.oversize_skipped = state["oversize_skipped"]


def collate_rows(rows: list[list[TokenSample]], seq_length: int, pad_id: int) -> PackedBatch:
    """Lay out rows of samples as one :class:`PackedBatch` (tail padded with ``pad_id``)."""
    shape = (len(rows), seq_length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    tail_pad_mask = torch.zeros(shape, dtype=torch.bool)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    task_ids = torch.full(shape, -1, dtype=torch.long)
    task_counts: dict[str, int] = {}
    features = [s.speech_features for row in rows for s in row if s.speech_features is not None]
    for r, row in enumerate(rows):
        start = 0
        for index, sample in enumerate(row, start=1):
            end = start + len(sample)
            input_ids[r, start:end] = sample.tokens
            target_mask[r, start:end] = sample.target_mask
            tail_pad_mask[r, start:end] = sample.tail_pad_mask
            segment_ids[r, start:end] = index
            position_ids[r, start:end] = torch.arange(len(sample))
            task_ids[r, start:end] = TASKS.index(sample.task) if sample.task in TASKS else -1
            task_counts[sample.task] = task_counts.get(sample.task, 0) + 1
            start = end
    return PackedBatch(input_ids, target_mask, tail_pad_mask, segment_ids, position_ids,
                       sum(len(r) for r in rows), task_counts, task_ids,
                       torch.cat(features) if features else None)


def sample_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed samples of ``[b, s]`` segment ids (padding, id 0, excluded)."""
    return [int(n) for row in segment_ids for n in torch.bincount(row)[1:] if n]
