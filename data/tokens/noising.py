"""Diffusion noising (REFERENCE §3): which target tokens a training step masks, and their weights.

Two masking modes, selected by ``diffusion.masking``:

* ``per_token`` (released code): a threshold redrawn per token, ``thr = (1 - eps) u + eps``;
  a target token is masked when ``r <= thr`` (marginal rate ~0.5).
* ``per_sequence`` (paper, Eq. 1): one ``t ~ U(eps, 1]`` per packed sample; each target token is
  masked with probability ``t``; optional LLaDA ``1/t`` loss weight.

Attenuated tail-pad masking: samples whose targets hold no ``<|endoftext|>`` get ``k ~ U{1..16}``
of them appended as targets (:class:`TailPadder`), and those pads are masked with probability
``gamma x thr``. Prompts are never masked nor scored. All randomness comes from an explicit
``torch.Generator``, so a seed fixes the masks. The loss on the masked positions is the
platform's (``omnidiff.platform.objective``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.tokens.packing import PackedBatch, TokenSample


class TailPadder:
    """Append ``k ~ U{1..max_pads}`` end-of-text targets to samples that lack one."""

    def __init__(self, eos_id: int, max_pads: int = 16, seed: int = 0) -> None:
        self.eos_id = eos_id
        self.max_pads = max_pads
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, sample: TokenSample) -> TokenSample:
        targets = sample.tokens[sample.target_mask]
        if targets.numel() == 0 or bool((targets == self.eos_id).any()):
            return sample
        k = int(torch.randint(1, self.max_pads + 1, (1,), generator=self.generator))
        pads = torch.full((k,), self.eos_id, dtype=sample.tokens.dtype)
        ones = torch.ones(k, dtype=torch.bool)
        return replace(
            sample,
            tokens=torch.cat([sample.tokens, pads]),
            target_mask=torch.cat([sample.target_mask, ones]),
            tail_pad_mask=torch.cat([sample.tail_pad_mask, ones]),
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class NoisedBatch:
    """A packed batch after noising: what the model reads and where the loss looks.

    Everything a step needs is computed here, on the host, once: the scored positions as index
    tensors and the packed sequences' boundaries, so the step on the device never waits for the
    host (no ``nonzero`` or ``.item()`` per micro-batch).
    """

    input_ids: torch.Tensor  # [b, s] with masked targets replaced by the mask id
    labels: torch.Tensor  # [b, s] the clean tokens
    loss_mask: torch.Tensor  # [b, s] bool: masked target positions (the only scored ones)
    loss_weights: torch.Tensor  # [b, s] float: weight x normalisation; the loss is their dot
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    mask_level: torch.Tensor  # [b, s] the threshold/t each token was masked with
    scored_rows: torch.Tensor  # [n] long: row of every masked target, in loss_mask order
    scored_cols: torch.Tensor  # [n] long: its position in the row
    scored_tasks: torch.Tensor  # [n] long: its sample's task (index in TASKS, -1 unknown)
    cu_seqlens: torch.Tensor  # [runs + 1] int32: packed sequences of the flattened rows
    speech_features: torch.Tensor  # [frames, dim] float: continuous speech input ([0, 0]: none)
    speech_positions: torch.Tensor  # [frames] long: their places in the flattened rows

    @property
    def num_masked(self) -> int:
        return self.scored_rows.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NoisedBatch:
        """The same batch on ``device`` (``non_blocking`` from pinned host memory);
        ``cu_seqlens`` stays on the host, where the model reads the sequence lengths for free
        (and copies it to the device itself)."""
        return NoisedBatch(*(value if f.name == "cu_seqlens"
                             else value.to(device, non_blocking=non_blocking)
                             for f in fields(self) for value in (getattr(self, f.name),)))

    def pin_memory(self) -> NoisedBatch:
        return NoisedBatch(*(getattr(self, f.name).pin_memory() for f in fields(self)))


def packed_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32) of the rows laid end to end: one sequence per run of equal segment
    id in a row (a padding tail is a sequence of its own), as packed attention expects."""
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = torch.nonzero(starts.reshape(-1)).squeeze(1)
    total = torch.tensor([b * s], device=segment_ids.device)
    return torch.cat([flat, total]).to(torch.int32)


def check_label_shift(rows: torch.Tensor, cols: torch.Tensor, segment_ids: torch.Tensor) -> None:
    """With Dream's label shift a masked token at j is read from the hidden state at j - 1,
    which must lie in the same sample (a sample's first token is a prompt, never a target)."""
    if bool((cols == 0).any()) or bool(
            (segment_ids[rows, cols - 1] != segment_ids[rows, cols]).any()):
        raise ValueError("a target token starts its sample; label shift needs a prompt")


def _mask_levels(batch: PackedBatch, cfg: DiffusionConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """Per-token masking probability before attenuation, in ``[eps, 1]``."""
    shape = batch.input_ids.shape
    if cfg.masking == "per_token":
        u = torch.rand(shape, generator=generator)
        return (1 - cfg.eps) * u + cfg.eps
    # per_sequence: one t per packed sample (segment), t ~ U(eps, 1]
    num_segments = int(batch.segment_ids.max()) + 1
    u = torch.rand((shape[0], num_segments), generator=generator)
    t = cfg.eps + (1 - cfg.eps) * (1 - u)
    return torch.gather(t, 1, batch.segment_ids)


def _normalisation(loss_mask: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """Per-token divisor turning a weighted sum into the configured mean."""
    if mode == "token":
        return loss_mask.sum().clamp(min=1).to(torch.float32).expand(loss_mask.shape)
    # "sample": mean over samples of (sum over the sample's masked tokens / its target count)
    targets = batch.target_mask.long()
    counts = torch.zeros(batch.segment_ids.shape[0], int(batch.segment_ids.max()) + 1,
                         dtype=torch.long).scatter_add_(1, batch.segment_ids, targets)
    per_token = torch.gather(counts, 1, batch.segment_ids).clamp(min=1)
    num_samples = int((counts[:, 1:] > 0).sum())
    return (per_token * max(num_samples, 1)).to(torch.float32)


def noise_batch(batch: PackedBatch, cfg: DiffusionConfig, mask_id: int,
                generator: torch.Generator, feature_id: int | None = None) -> NoisedBatch:
    """Mask target tokens per the configured mode; prompts and padding are never touched.

    ``feature_id``: the token (``<|context_of_audio|>``) whose places the batch's speech features
    take, in order (prompt tokens: never masked).
    """
    level = _mask_levels(batch, cfg, generator)
    attenuation = torch.where(batch.tail_pad_mask, cfg.tail_pad_gamma, 1.0)
    draw = torch.rand(batch.input_ids.shape, generator=generator)
    loss_mask = batch.target_mask & (draw <= level * attenuation)
    weights = torch.ones_like(level)
    if cfg.importance_weighting:
        weights = 1.0 / level
    weights = torch.where(loss_mask, weights / _normalisation(loss_mask, batch,
                                                               cfg.loss_normalization), 0.0)
    rows, cols = loss_mask.nonzero(as_tuple=True)
    if cfg.label_shift:
        check_label_shift(rows, cols, batch.segment_ids)
    return NoisedBatch(
        input_ids=torch.where(loss_mask, torch.full_like(batch.input_ids, mask_id),
                              batch.input_ids),
        labels=batch.input_ids,
        loss_mask=loss_mask,
        loss_weights=weights,
        position_ids=batch.position_ids,
        segment_ids=batch.segment_ids,
        mask_level=level,
        scored_rows=rows,
        scored_cols=cols,
        scored_tasks=(batch.task_ids[rows, cols] if batch.task_ids is not None
                      else torch.full_like(rows, -1)),
        cu_seqlens=packed_cu_seqlens(batch.segment_ids),
        **_speech_inputs(batch, feature_id),
    )


def _speech_inputs(batch: PackedBatch, feature_id: int | None) -> dict[str, torch.Tensor]:
    features = batch.speech_features
    if features is None or feature_id is None:
        return {"speech_features": torch.zeros(0, 0),
                "speech_positions": torch.zeros(0, dtype=torch.long)}
    positions = (batch.input_ids.reshape(-1) == feature_id).nonzero().squeeze(1)
    if len(positions) != len(features):
        raise ValueError(f"{len(features)} speech feature frames for {len(positions)} places")
    return {"speech_features": features, "speech_positions": positions}
