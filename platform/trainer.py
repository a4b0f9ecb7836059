"""The train loop: config -> topology -> data -> model -> engine -> monitoring -> checkpoint.

Readable on purpose (torchtitan style): :meth:`Trainer.run` is the whole loop. Everything that
varies between a laptop and a cluster (process groups, ZeRO, pipeline stages) lives behind the
engine; the loop itself is identical everywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omnidiff.data.batches import PackedBatchStream
from omnidiff.data.sources import build_sample_source
from omnidiff.data.text_tokenizer import load_text_tokenizer
from omnidiff.data.vocab import UnifiedVocab
from omnidiff.monitoring.metrics import MetricsLogger
from omnidiff.monitoring.throughput import ThroughputMeter, flops_per_token
from omnidiff.parallel import topology
from omnidiff.parallel.engines import build_engine
from omnidiff.platform import checkpoint
from omnidiff.platform.config import RunConfig, dump_config
from omnidiff.platform.diffusion import NoisedBatch, TailPadder, noise_batch
from omnidiff.platform.engine import TrainEngine

log = logging.getLogger("omnidiff.train")


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, micro-batch, rank, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def build_vocab(cfg: RunConfig):
    tokenizer = load_text_tokenizer(cfg.data.text_tokenizer)
    vocab = UnifiedVocab.from_text_tokenizer(tokenizer, cfg.data.speech_codebook_size,
                                             cfg.data.image_codebook_size)
    return vocab, tokenizer


def batch_stream(cfg: RunConfig, vocab: UnifiedVocab, tokenizer, dp_rank: int = 0,
                 dp: int = 1) -> PackedBatchStream:
    """This DP rank's packed micro-batches (its own part of the samples)."""
    source = build_sample_source(cfg, vocab, tokenizer, dp_rank, dp)
    transform = None
    if cfg.diffusion.tail_pad:
        transform = TailPadder(vocab.eos_id, cfg.diffusion.tail_pad_max,
                               seed_for(cfg.seed, 1, dp_rank))
    return PackedBatchStream(source, cfg.data.seq_length, vocab.eos_id,
                             cfg.data.micro_batch_size, transform)


def noised_micro_batches(cfg: RunConfig, vocab: UnifiedVocab, batches: PackedBatchStream,
                         step: int, count: int, dp_rank: int = 0) -> list[NoisedBatch]:
    """The next ``count`` micro-batches, noised with seeds fixed by (seed, step, micro, rank)."""
    return [noise_batch(next(batches), cfg.diffusion, vocab.mask_id,
                        torch.Generator().manual_seed(seed_for(cfg.seed, step, i, dp_rank)))
            for i in range(count)]


@dataclass
class TrainSummary:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    seconds: float = 0.0
    checkpoint: str | None = None


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state

        self.cfg = cfg
        self.dims = topology.initialize(cfg.parallel.tensor_parallel,
                                        cfg.parallel.pipeline_parallel)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.is_main = torch.distributed.get_rank() == 0
        self.output_dir = Path(cfg.output_dir)
        self.vocab, tokenizer = build_vocab(cfg)
        micro = cfg.data.micro_batch_size * self.dims.dp
        if cfg.data.global_batch_size % micro:
            raise ValueError(
                f"data.global_batch_size ({cfg.data.global_batch_size}) must be a multiple of "
                f"micro_batch_size x data-parallel size ({micro})")
        self.accumulation = cfg.data.global_batch_size // micro

        vocab_size = self.vocab.padded_size(cfg.parallel.tensor_parallel)
        self.engine: TrainEngine = build_engine(cfg, vocab_size)
        self.batches = batch_stream(cfg, self.vocab, tokenizer, self.dp_rank, self.dims.dp)
        self.metrics = MetricsLogger(self.output_dir, tensorboard=cfg.logging.tensorboard)
        scored = 0.5 * 0.6  # ~half the targets masked; targets ~60% of tokens in the demo mix
        self.meter = ThroughputMeter(flops_per_token(cfg.model, vocab_size,
                                                     cfg.data.seq_length, scored))

    # --- checkpoints -------------------------------------------------------------------------
    def _save(self, step: int) -> Path:
        state = {"engine": self.engine.state_dict(), "data": self.batches.state_dict(),
                 "step": step}
        return checkpoint.save(self.output_dir, step, state, self.cfg.checkpoint.keep_last,
                               meta={"config": self.cfg.model_dump(mode="json")})

    def _resume(self) -> int:
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, self.output_dir)
        if path is None:
            return 0
        state = checkpoint.load(path)
        self.engine.load_state_dict(state["engine"])
        self.batches.load_state_dict(state["data"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        cfg = self.cfg
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(dump_config(cfg))
        start = self._resume()
        summary = TrainSummary()
        began = time.perf_counter()
        bar = tqdm(range(start, cfg.schedule.train_steps), initial=start,
                   total=cfg.schedule.train_steps, desc="train", unit="step",
                   disable=not (cfg.logging.progress_bar and self.is_main))
        for step in bar:
            micro_batches = noised_micro_batches(cfg, self.vocab, self.batches, step,
                                                 self.accumulation, self.dp_rank)
            result = self.engine.train_step(micro_batches)
            self.meter.add(sum(b.input_ids.numel() for b in micro_batches) * self.dims.dp)
            summary.losses.append(result.loss)
            summary.skipped_steps += int(result.skipped)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}")
            done = step + 1
            if done % cfg.logging.log_interval == 0 or done == cfg.schedule.train_steps:
                self.metrics.log(done, {"loss": result.loss, "grad_norm": result.grad_norm,
                                        "lr": result.lr, "masked_tokens": result.num_masked,
                                        "skipped_steps": summary.skipped_steps,
                                        **self.meter.report(), **self.batches.metrics()})
            interval = cfg.checkpoint.save_interval
            due = (interval and done % interval == 0) or done == cfg.schedule.train_steps
            if due and not result.skipped:  # so the newest checkpoint is always a good one
                summary.checkpoint = str(self._save(done))
        summary.steps = len(summary.losses)
        summary.seconds = time.perf_counter() - began
        self.metrics.close()
        return summary
