"""The masked-diffusion sampler: one loop for every model form (megatron at any TP, the HF class,
a saved HF folder), reached through a ``logits_fn``.

A :class:`GenerationRequest` is one row: the prompt, then the answer region, in which every
``<|mask|>`` is to be generated and every other token is fixed (pre-filled frame tokens such as
``<|begin_of_image|>``, a ``<|begin_of_audio|>`` placed inside a spoken answer, a closing
``<|im_end|>``). Requests of different lengths are batched as right-padded rows whose padding has
segment id 0, so each row attends only to itself (the packed-attention convention of training).

Each step (REFERENCE §6, the Omni-Diffusion release's ``_sample``): one forward over the active
rows (plus their unconditional twins under guidance), Dream's label shift (the logit at i predicts
token i + 1), a proposal and a confidence for every masked position, then the
``int(n_masked * (1 - s / t))`` (at least one) most confident positions of the current block are
committed. Under tensor parallelism every rank runs this same loop on gathered logits with an
identically seeded generator, and ``sync`` (e.g. a broadcast from TP rank 0) makes the ranks'
choices identical by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from omnidiff.platform.config import SamplerConfig  # noqa: F401 - re-exported with the sampler
from omnidiff.platform.sampling import rules

Tensor = torch.Tensor
# (input_ids, position_ids, segment_ids), each [b, s] -> logits [b, s, V] (V may exceed the
# vocabulary: padded embedding rows are never chosen)
LogitsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
SyncFn = Callable[[Tensor], None]  # makes a token tensor identical on every rank, in place


@dataclass
class GenerationRequest:
    """One row: ``tokens[:start]`` is the prompt; masks at or after ``start`` get generated."""

    tokens: Tensor  # [n] long
    start: int
    uncond_prompt: Tensor | None = None  # replaces tokens[:start] in the guidance branch
    steps: int | None = None  # this row's step budget (default: SamplerConfig.steps)
    allowed: Tensor | None = None  # [vocab] bool: the only ids the masks may become (opt-in)

    def __post_init__(self) -> None:
        self.tokens = torch.as_tensor(self.tokens, dtype=torch.long)
        if self.tokens.dim() != 1 or not 1 <= self.start <= len(self.tokens):
            raise ValueError(f"a request needs 1-D tokens and 1 <= start <= {len(self.tokens)}, "
                             f"got start {self.start}")

    @property
    def answer(self) -> Tensor:
        return self.tokens[self.start:]


class _Row:
    """One request's evolving tokens and its block / step position."""

    def __init__(self, request: GenerationRequest, config: SamplerConfig, mask_id: int) -> None:
        self.tokens = request.tokens.clone()
        self.start = request.start
        self.uncond = request.uncond_prompt
        self.allowed = request.allowed
        self.mask_id = mask_id
        region = len(self.tokens) - self.start
        steps = request.steps or config.steps
        size = config.block_size or max(region, 1)
        self.plan: list[tuple[int, int, int]] = []  # (lo, hi, steps), region coordinates
        for lo in range(0, region, size):
            hi = min(lo + size, region)
            masked = int((self.answer[lo:hi] == mask_id).sum())
            if masked:  # the release gives a block its share of the steps
                self.plan.append((lo, hi, min(masked, max(1, int((hi - lo) / region * steps)))))
        self.block = self.step = 0

    @property
    def answer(self) -> Tensor:
        return self.tokens[self.start:]

    @property
    def done(self) -> bool:
        return self.block >= len(self.plan)

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self.plan)

    def advance(self, logits: Tensor, config: SamplerConfig, vocab_size: int,
                generator: torch.Generator | None) -> None:
        """Commit this step's most confident proposals inside the current block."""
        lo, hi, steps = self.plan[self.block]
        masked = (self.answer == self.mask_id).nonzero()[:, 0]
        confidence, proposal = self._propose(logits[masked], config, vocab_size, generator)
        in_block = (masked >= lo) & (masked < hi)
        ts = rules.timesteps(steps, config.eps)
        count = rules.transfer_count(int(in_block.sum()), float(ts[self.step]),
                                     float(ts[self.step + 1]), last=self.step == steps - 1)
        chosen = confidence.masked_fill(~in_block, float("-inf")).topk(count).indices
        self.answer[masked[chosen]] = proposal[chosen]
        self.step += 1

    def settle(self) -> None:
        """Move to the next block once this one is spent or filled (after any rank sync, so
        every rank decides on the same tokens)."""
        lo, hi, steps = self.plan[self.block]
        if self.step == steps or not bool((self.answer[lo:hi] == self.mask_id).any()):
            self.block, self.step = self.block + 1, 0

    def _propose(self, logits: Tensor, config: SamplerConfig, vocab_size: int,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """A token and a confidence for each masked position (release ``sample_tokens``)."""
        logits = logits[:, :vocab_size].float().clone()
        logits[:, self.mask_id] = float("-inf")
        if self.allowed is not None:
            logits[:, ~self.allowed[:vocab_size]] = float("-inf")
        logits = rules.warp(logits, config.temperature, config.top_p, config.top_k)
        if config.repeat_penalty != 1.0:
            present = self.tokens[self.tokens != self.mask_id].unique()
            present = present[present < vocab_size]
            logits[:, present] = rules.penalise(logits[:, present], config.repeat_penalty)
        if config.position_penalty != 1.0:
            factors = rules.position_penalty_factors(len(logits), config.position_penalty,
                                                     config.penalty_start)
            logits = rules.penalise(logits, factors[:, None])
        probs = torch.softmax(logits, dim=-1)
        proposal = rules.choose_tokens(probs, config.temperature, generator)
        return rules.confidence_of(probs, proposal, config.confidence), proposal


def pad_rows(rows: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``position_ids`` (0.. per row) and ``segment_ids`` (1 real,
    0 padding: padding neither attends to nor is seen by the row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        segments[i, :len(row)] = 1
    positions = torch.arange(width).expand_as(ids) * segments
    return ids, positions, segments


def _answer_logits(logits_fn: LogitsFn, rows: Sequence[_Row], config: SamplerConfig) -> list[Tensor]:
    """Logits predicting each row's answer region, guided when ``config.guidance`` > 0."""
    seqs = [r.tokens for r in rows]
    starts = [r.start for r in rows]
    if config.guidance > 0:
        seqs += [torch.cat([r.uncond, r.answer]) for r in rows]
        starts += [len(r.uncond) for r in rows]
    ids, positions, segments = pad_rows(seqs, rows[0].mask_id)
    logits = logits_fn(ids, positions, segments)
    shift = int(config.label_shift)  # Dream: the logit at i predicts token i + 1
    regions = [logits[i, start - shift: len(seq) - shift]
               for i, (seq, start) in enumerate(zip(seqs, starts))]
    if config.guidance > 0:
        n = len(rows)
        regions = [rules.guided(c.float(), u.float(), config.guidance)
                   for c, u in zip(regions[:n], regions[n:])]
    return regions


@torch.no_grad()
def generate(logits_fn: LogitsFn, requests: Sequence[GenerationRequest], config: SamplerConfig,
             *, mask_id: int, vocab_size: int, generator: torch.Generator | None = None,
             sync: SyncFn | None = None, progress: bool = False) -> list[Tensor]:
    """Fill every request's masks; returns each row's final tokens (prompt included).

    ``vocab_size``: the real token ids (logits of padded embedding rows are never chosen).
    ``generator`` draws the temperature sampling; seed it identically on every TP rank.
    """
    if config.guidance > 0 and any(r.uncond_prompt is None for r in requests):
        raise ValueError("guidance needs an unconditional prompt (uncond_prompt) on every request")
    rows = [_Row(request, config, mask_id) for request in requests]
    bar = tqdm(total=max((r.total_steps for r in rows), default=0), desc="sample", unit="step",
               disable=not progress)
    while active := [r for r in rows if not r.done]:
        for row, logits in zip(active, _answer_logits(logits_fn, active, config)):
            row.advance(logits, config, vocab_size, generator)
        if sync is not None:
            flat = torch.cat([r.tokens for r in active])
            sync(flat)
            for row, synced in zip(active, flat.split([len(r.tokens) for r in active])):
                row.tokens.copy_(synced)
        for row in active:
            row.settle()
        bar.update(1)
    bar.close()
    return [r.tokens for r in rows]
