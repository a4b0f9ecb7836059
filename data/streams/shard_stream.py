"""Training samples from media shards: a DALI reader, then the media and sequence tokenizers.

``shards -> MediaReader (this DP rank's part) -> SampleTokenizer -> TokenSample``. Every rank
of a data-parallel group (TP and PP peers) builds the same stream, so they see the same samples
without a broadcast.

Resume is exact and cheap: a stream's state is its reader's DALI checkpoint plus the samples
already tokenised but not yet handed out. Bad samples are skipped and counted by the reader
(``data/skipped_*`` metrics), including those rejected after decoding.
"""

from __future__ import annotations

from typing import Any

from omnidiff.data.media.reader import MediaReader, MediaReaderConfig, MediaReaderError
from omnidiff.data.streams.media_tokenize import Rejected, SampleTokenizer
from omnidiff.data.tokens.packing import TokenSample


def reader_config(data_cfg, shards: list[str], seed: int, shuffle: bool = True
                  ) -> MediaReaderConfig:
    """The media reader settings of a run's ``data`` section."""
    return MediaReaderConfig(
        shards=shards, batch_size=data_cfg.reader_batch_size, image_size=data_cfg.image_size,
        generated_image_size=data_cfg.generated_image_size, shuffle=shuffle,
        shuffle_buffer=data_cfg.shuffle_buffer, seed=seed,
        decode_budget_pixels=data_cfg.decode_budget_pixels,
        decode_budget_audio_seconds=data_cfg.decode_budget_audio_seconds,
        skip_bad_shards=data_cfg.skip_bad_shards)


class ShardStream:
    """Endless token samples of one source for data-parallel rank ``dp_rank`` of ``dp``."""

    def __init__(self, config: MediaReaderConfig, tokenize: SampleTokenizer, dp_rank: int = 0,
                 dp: int = 1) -> None:
        self.reader = MediaReader(config, shard_id=dp_rank, num_shards=dp)
        self.tokenize = tokenize
        self._pending: list[TokenSample] = []
        self._fruitless = 0  # samples read since the last one that became a sequence

    def __iter__(self) -> ShardStream:
        return self

    def read_batch(self) -> list[TokenSample]:
        """Tokenise the reader's next batch; the samples that became no sequence are rejected
        through the reader (counted and logged like the ones it skipped itself)."""
        batch = next(self.reader)
        good = []
        for sample, result in zip(batch.samples, self.tokenize(batch)):
            if isinstance(result, Rejected):
                self.reader.reject(sample.key, sample.shard, result.reason, result.detail)
            else:
                good.append(result)
        return good

    def __next__(self) -> TokenSample:
        while not self._pending:
            before = self.reader.samples_read
            self._pending = self.read_batch()
            read = self.reader.samples_read - before
            self._fruitless = 0 if self._pending else self._fruitless + read
            if self._fruitless >= max(self.reader.epoch_size, 1):
                raise MediaReaderError(
                    f"no sample of shards {self.reader.config.shards} became a token sequence in "
                    f"a full pass; skipped: {dict(+self.reader.skipped)}")
        return self._pending.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {"reader": self.reader.state_dict(),
                "pending": [sample.to_state() for sample in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reader.load_state_dict(state["reader"])
        self._pending = [TokenSample.from_state(sample) for sample in state["pending"]]

    def metrics(self) -> dict[str, int]:
        return self.reader.metrics()
