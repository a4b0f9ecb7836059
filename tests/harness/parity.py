"""The same optimizer steps on any parallel layout: the parallel-vs-serial checks.

Every process regenerates the same global batches (the DP=1 trainer's data and noising seeds);
each DP rank takes its contiguous share of every step's micro-batches, so every layout sees the
same global batch and, in exact arithmetic, takes the same steps. A :class:`ParityResult` holds
the per-step loss and gradient norm and the full (TP=1) weights before and after, gathered with
:mod:`omnidiff.parallel.resharding`, so any two layouts compare directly. Used by the tests and
usable as a smoke check of a new cluster's parallel set-up (``tests/harness`` is the suite's own
code: harnesses and fault injection, never imported by the package).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from omnidiff.data.streams.batches import batch_stream, noised_micro_batches
from omnidiff.data.streams.sources import build_sample_source
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.data.tokens.text import build_vocab
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.engines import build_engine
from omnidiff.parallel.engines.base import StepResult, TrainEngine
from omnidiff.parallel.resharding import gather_full_state_dict
from omnidiff.platform.config import RunConfig, load_config
from omnidiff.platform.objective import DiffusionObjective

Tensor = torch.Tensor


def parity_config(*overrides: str, steps: int = 5, micro_batches: int = 4) -> RunConfig:
    """A 2-layer tiny model on 64-token rows, ``micro_batches`` rows of 1 per step; clipping
    on (it binds at these settings, so the norm matters) and warm-up then cosine lr.

    Adam's eps is 1e-6, not 1e-8: Adam turns any gradient well above eps into a step of about
    lr, so with a tiny eps the float round-off of near-zero gradients (e.g. of the K bias, whose
    gradient only RoPE keeps from vanishing) decides lr-sized updates and layouts drift apart
    by more than their arithmetic differs.
    """
    return load_config(None, [
        "model.preset=tiny", "model.num_layers=2", "data.seq_length=64",
        "data.image_codebook_size=64", "data.speech_codebook_size=64",
        "data.micro_batch_size=1", f"data.global_batch_size={micro_batches}",
        f"schedule.train_steps={steps}", "schedule.warmup_fraction=0.2",
        "optimizer.lr=1e-3", "optimizer.eps=1e-6", "optimizer.weight_decay=0.01",
        "optimizer.grad_clip=1.0",
        "logging.progress_bar=false", *overrides,
    ])


def global_batches(cfg: RunConfig) -> list[list[NoisedBatch]]:
    """Every step's micro-batches of the whole (DP=1) global batch."""
    vocab, tokenizer = build_vocab(cfg.data)
    source = build_sample_source(cfg.data, cfg.seed, vocab, tokenizer)
    stream = batch_stream(source, cfg.data, cfg.diffusion, vocab, cfg.seed)
    count = cfg.data.global_batch_size // cfg.data.micro_batch_size
    return [noised_micro_batches(stream, cfg.diffusion, vocab, cfg.seed, step, count)
            for step in range(cfg.schedule.train_steps)]


def vocab_rows(cfg: RunConfig, tp: int) -> int:
    """Embedding rows padded for ``tp`` (use the largest TP compared, for every layout)."""
    return build_vocab(cfg.data)[0].padded_size(tp)


def with_nan_loss(noised: NoisedBatch) -> NoisedBatch:
    """The same micro-batch with NaN token weights: a non-finite loss, as a diverged step."""
    return replace(noised, loss_weights=torch.full_like(noised.loss_weights, float("nan")))


def local_share(micro_batches: list[NoisedBatch], dims: ParallelDims) -> list[NoisedBatch]:
    """This DP rank's contiguous share of one step's global micro-batches."""
    share = len(micro_batches) // dims.dp
    return micro_batches[dims.dp_rank * share:(dims.dp_rank + 1) * share]


@dataclass
class ParityResult:
    losses: list[float]
    grad_norms: list[float]
    initial: dict[str, Tensor]
    final: dict[str, Tensor]


def run_parity(cfg: RunConfig, dims: ParallelDims, batches: list[list[NoisedBatch]],
               rows: int) -> tuple[ParityResult, TrainEngine]:
    """Train on ``batches`` with the engine ``cfg`` selects (topology must be initialised)."""
    engine = build_engine(cfg, dims, rows, DiffusionObjective(cfg.diffusion))
    initial = gather_full_state_dict(engine.model)
    losses, norms = [], []
    for micro_batches in batches:
        result = engine.train_step(local_share(micro_batches, dims))
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return ParityResult(losses, norms, initial, gather_full_state_dict(engine.model)), engine


def max_relative_difference(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want|| (absolute where want is 0); keys must match."""
    if sorted(got) != sorted(want):
        raise ValueError(f"different tensors: {sorted(set(got) ^ set(want))[:4]}")
    return max(relative_differences(got, want).values())


def relative_differences(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, float]:
    out = {}
    for key, ref in want.items():
        ref = ref.double()
        scale = float(ref.norm()) or 1.0
        out[key] = float((got[key].double() - ref).norm()) / scale
    return out


def load_worker_results(path) -> object:
    """What a test's worker processes saved (tensors, dicts, :class:`StepResult`), read back as
    anything from disk is: ``weights_only``, with the classes the results hold allowed."""
    with torch.serialization.safe_globals([StepResult, ParityResult]):
        return torch.load(path, weights_only=True)
