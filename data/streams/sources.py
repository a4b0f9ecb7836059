"""The run's sample source, by ``data.source``: synthetic tokens, media shards or token shards.

Shard sources come from a mixture file's stage (a ratio per source, drawn by
:class:`MixtureSampler`) or from ``data.paths`` read as one source. Every source is an endless,
resumable ``TokenSample`` stream; :func:`build_sample_source` is the one place that picks it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from omnidiff.data.config import DataConfig
from omnidiff.data.streams.batches import SampleSource
from omnidiff.data.streams.mixture import load_mixture_config
from omnidiff.data.streams.mixture_sampler import MixtureSampler
from omnidiff.data.tokens.packing import TokenSample
from omnidiff.data.streams.synthetic import SyntheticMultimodal, SyntheticSource
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab

SINGLE_SOURCE = "data"  # the source name when ``data.paths`` is given instead of a mixture


def stage_sources(data_cfg) -> tuple[dict[str, list[str]], dict[str, float]]:
    """``({source: shard specs}, {source: ratio})`` of the configured mixture stage or paths."""
    if not data_cfg.mixture:
        return {SINGLE_SOURCE: list(data_cfg.paths)}, {SINGLE_SOURCE: 1.0}
    mixture = load_mixture_config(data_cfg.mixture)
    ratios = mixture.ratios(data_cfg.stage)
    return {name: mixture.shard_specs(name) for name in ratios}, ratios


class MixedSource:
    """Several endless, stateful streams drawn by ratio, as one resumable source."""

    def __init__(self, streams: dict[str, Callable[[], Iterator[TokenSample]]],
                 ratios: dict[str, float], seed: int) -> None:
        self.mixture = MixtureSampler({name: (lambda _pass, make=make: make())
                                       for name, make in streams.items()}, ratios, seed=seed)

    def __iter__(self) -> MixedSource:
        return self

    def __next__(self) -> TokenSample:
        return next(self.mixture)[1]

    def state_dict(self) -> dict[str, Any]:
        return self.mixture.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)

    def metrics(self) -> dict[str, int]:
        """Counters (reader skips, ...) summed over the streams opened so far."""
        total: Counter[str] = Counter()
        for stream in self.mixture.sources().values():
            total.update(getattr(stream, "metrics", dict)())
        return dict(total)


def build_sample_source(data: DataConfig, seed: int, vocab: UnifiedVocab,
                        tokenizer: TextTokenizer, dp_rank: int = 0, dp: int = 1) -> SampleSource:
    """Data-parallel rank ``dp_rank``'s sample stream of a run's ``data`` section."""
    if data.source == "synthetic":
        world = SyntheticMultimodal(vocab, tokenizer, seed,
                                    speech_feature_size=data.heard_feature_size)
        return SyntheticSource(world, start=dp_rank, step=dp)
    specs, ratios = stage_sources(data)
    mix_seed = seed + 7919 * dp_rank  # the draw order differs per DP rank, as the data does
    if data.source == "token_shards":
        from omnidiff.data.streams.token_shards import TokenShardSource

        return MixedSource({name: (lambda s=s: TokenShardSource(s, vocab, seed, dp_rank, dp))
                            for name, s in specs.items()}, ratios, mix_seed)
    from omnidiff.data.streams.media_tokenize import (
        SampleTokenizer, load_speech_encoder, load_tokenizers)
    from omnidiff.data.tokens.sequences import SequenceBuilder
    from omnidiff.data.streams.shard_stream import ShardStream, reader_config

    image, speech = load_tokenizers(data.image_tokenizer, data.speech_tokenizer, vocab)
    tokenize = SampleTokenizer(SequenceBuilder(vocab, tokenizer), image, speech, data.seq_length,
                               load_speech_encoder(data))
    return MixedSource({name: (lambda s=s: ShardStream(reader_config(data, s, seed),
                                                       tokenize, dp_rank, dp))
                        for name, s in specs.items()}, ratios, mix_seed)
