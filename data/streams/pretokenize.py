"""``omnidiff tokenize``: media shards -> token shards, one pass per source, same path as training.

Each source of the mixture (every source, whatever the stage) is read once in shard order by the
DALI reader, tokenised by the run's media tokenizers and sequence builder, and written as
``{source}-NNNNNN.npz`` token shards; a ``mixture.yaml`` beside them keeps the original stages and
ratios, so a run switches to the fast path with ``data.source=token_shards
data.mixture=OUT/mixture.yaml``. Bad samples are skipped and counted exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from omnidiff.data.streams.media_tokenize import SampleTokenizer, load_tokenizers
from omnidiff.data.streams.mixture import load_mixture_config
from omnidiff.data.tokens.sequences import SequenceBuilder
from omnidiff.data.streams.shard_stream import ShardStream, reader_config
from omnidiff.data.media.shards import list_shards
from omnidiff.data.streams.sources import SINGLE_SOURCE, stage_sources
from omnidiff.data.streams.token_shards import SUFFIX, TokenShardWriter
from omnidiff.data.tokens.vocab import TextTokenizer, UnifiedVocab


@dataclass
class SourceReport:
    samples_read: int
    written: int
    shards: list[str]  # token shard file names
    skipped: dict[str, int] = field(default_factory=dict)  # per reason


def _all_sources(data_cfg) -> tuple[dict[str, list[str]], dict | None]:
    """Every source's shard specs, and the mixture's stages (None for plain paths)."""
    if not data_cfg.mixture:
        specs, _ = stage_sources(data_cfg)
        return specs, None
    mixture = load_mixture_config(data_cfg.mixture)
    return {name: mixture.shard_specs(name) for name in mixture.sources}, mixture.stages


def _pass_batch_size(shards: list[str], limit: int) -> int:
    """The largest reader batch <= ``limit`` that divides the sample count: one pass ends exactly
    at a batch boundary, so no sample is read twice and every count is exact."""
    total = sum(info.num_samples for info in list_shards(shards))
    return max(d for d in range(1, min(limit, total) + 1) if total % d == 0)


def tokenize_shards(data_cfg, out_dir: str | Path, vocab: UnifiedVocab, text: TextTokenizer,
                    shard_size: int = 10_000, progress: bool = True
                    ) -> tuple[dict[str, SourceReport], Path]:
    """Write token shards and their ``mixture.yaml`` into ``out_dir``; report per source."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, speech = load_tokenizers(data_cfg.image_tokenizer, data_cfg.speech_tokenizer, vocab)
    tokenize = SampleTokenizer(SequenceBuilder(vocab, text), image, speech, data_cfg.seq_length)
    specs, stages = _all_sources(data_cfg)
    reports: dict[str, SourceReport] = {}
    for name, shards in specs.items():
        config = reader_config(data_cfg, shards, seed=0, shuffle=False).model_copy(
            update={"batch_size": _pass_batch_size(shards, data_cfg.reader_batch_size)})
        stream = ShardStream(config, tokenize)
        reader = stream.reader
        writer = TokenShardWriter(out_dir / f"{name}-%06d{SUFFIX}", vocab, shard_size)
        written = 0
        with tqdm(total=reader.epoch_size, desc=f"tokenize {name}", unit="sample",
                  disable=not progress) as bar:
            while reader.samples_read < reader.epoch_size:
                for sample in stream.read_batch():
                    writer.write(sample)
                    written += 1
                bar.update(reader.samples_read - bar.n)
        paths = writer.close()
        reports[name] = SourceReport(reader.samples_read, written, [p.name for p in paths],
                                     {reason: n for reason, n in reader.skipped.items() if n})
    kept = {name for name, report in reports.items() if report.shards}
    stages = {stage: ratios for stage, all_ratios in
              (stages or {"default": {SINGLE_SOURCE: 1.0}}).items()
              if (ratios := {n: r for n, r in all_ratios.items() if n in kept})}
    document = {"sources": {name: {"shards": [f"{name}-*{SUFFIX}"]} for name in sorted(kept)},
                "stages": stages}
    mixture = out_dir / "mixture.yaml"
    mixture.write_text("# Token shards written by omnidiff tokenize.\n"
                       + yaml.safe_dump(document, sort_keys=False))
    return reports, mixture
