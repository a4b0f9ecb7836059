"""Token shards: pre-tokenised samples (``omnidiff tokenize``), the fast path for multi-epoch runs.

One shard is an ``.npz`` file (no pickles) holding a block of samples back to back::

    tokens   int32 [total]     unified-vocabulary ids
    targets  bool  [total]     assistant-turn (scored) positions
    offsets  int64 [n + 1]     sample i is tokens[offsets[i]:offsets[i + 1]]
    tasks    str   [n]         task name per sample
    vocab    str   []          JSON: the vocabulary the ids belong to (checked when read)

:class:`TokenShardSource` streams them endlessly: each epoch visits every sample once in an order
fixed by (seed, epoch), data-parallel rank ``r`` of ``n`` taking every n-th sample; its state is
(epoch, position), so resuming costs nothing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.media.shards import ShardError, expand_shard_specs
from omnidiff.data.tokens.vocab import UnifiedVocab

SUFFIX = ".npz"


def vocab_signature(vocab: UnifiedVocab) -> dict[str, int]:
    """What must agree between the tokenize run and the training run for the ids to mean the same."""
    return {"size": vocab.size, "mask_id": vocab.mask_id, "eos_id": vocab.eos_id,
            "speech_offset": vocab.speech_offset, "image_offset": vocab.image_offset,
            "speech_codebook_size": vocab.speech_codebook_size,
            "image_codebook_size": vocab.image_codebook_size}


class TokenShardWriter:
    """Write samples into ``pattern % index`` shards of at most ``max_samples`` samples each."""

    def __init__(self, pattern: str | Path, vocab: UnifiedVocab, max_samples: int = 10_000) -> None:
        self.pattern, self.max_samples = str(pattern), max_samples
        self.signature = json.dumps(vocab_signature(vocab), sort_keys=True)
        self.shards: list[Path] = []
        self._open: list[TokenSample] = []

    def write(self, sample: TokenSample) -> None:
        self._open.append(sample)
        if len(self._open) >= self.max_samples:
            self._flush()

    def close(self) -> list[Path]:
        if self._open:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        path = Path(self.pattern % len(self.shards))
        lengths = [len(s) for s in self._open]
        arrays = {
            "tokens": torch.cat([s.tokens for s in self._open]).numpy().astype(np.int32),
            "targets": torch.cat([s.target_mask for s in self._open]).numpy(),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "tasks": np.array([s.task for s in self._open], dtype=str),
            "vocab": np.array(self.signature),
        }
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as handle:  # np.savez on a path would append .npz to the temp name
            np.savez(handle, **arrays)
        os.replace(tmp, path)  # atomic: a shard is whole or absent
        self.shards.append(path)
        self._open = []


def _open_shard(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in ("tokens", "targets", "offsets", "tasks", "vocab")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ShardError(f"token shard {path}: cannot read it ({err})") from None


class TokenShardSource:
    """Endless, resumable :class:`TokenSample` stream over token shards for one DP rank."""

    def __init__(self, specs: str | Iterable[str], vocab: UnifiedVocab, seed: int = 0,
                 dp_rank: int = 0, dp: int = 1) -> None:
        self.paths = expand_shard_specs(specs)
        expected = vocab_signature(vocab)
        self.counts = []
        for path in self.paths:
            shard = _open_shard(path)
            found = json.loads(str(shard["vocab"]))
            if found != expected:
                differ = sorted(k for k in expected if found.get(k) != expected[k])
                raise ShardError(f"token shard {path}: tokenised with another vocabulary "
                                 f"({', '.join(differ)} differ); run omnidiff tokenize again")
            self.counts.append(len(shard["offsets"]) - 1)
        self.total = sum(self.counts)
        if self.total == 0:
            raise ShardError(f"token shards {[str(p) for p in self.paths]} hold no samples")
        self.seed, self.dp_rank, self.dp = seed, dp_rank, dp
        self.epoch, self.position = 0, dp_rank  # position in this epoch's global order
        self._order: tuple[int, np.ndarray] | None = None
        self._cached: tuple[int, dict[str, np.ndarray]] | None = None

    def _epoch_order(self) -> np.ndarray:
        """``[total, 2]`` (shard, sample) pairs: shards shuffled, then samples within each."""
        if self._order is None or self._order[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            pairs = [np.stack([np.full(self.counts[s], s), rng.permutation(self.counts[s])], 1)
                     for s in rng.permutation(len(self.paths))]
            self._order = (self.epoch, np.concatenate(pairs))
        return self._order[1]

    def __iter__(self) -> TokenShardSource:
        return self

    def __next__(self) -> TokenSample:
        while self.position >= self.total:
            self.epoch += 1
            self.position -= self.total
        shard_index, sample = (int(v) for v in self._epoch_order()[self.position])
        self.position += self.dp
        if self._cached is None or self._cached[0] != shard_index:
            self._cached = (shard_index, _open_shard(self.paths[shard_index]))
        shard = self._cached[1]
        start, end = shard["offsets"][sample], shard["offsets"][sample + 1]
        return TokenSample(tokens=torch.from_numpy(shard["tokens"][start:end].astype(np.int64)),
                           target_mask=torch.from_numpy(shard["targets"][start:end].copy()),
                           task=str(shard["tasks"][sample]))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["total"] != self.total:
            raise ShardError(f"token shard state is for {state['total']} samples, these shards "
                             f"hold {self.total}")
        self.epoch, self.position = state["epoch"], state["position"]
