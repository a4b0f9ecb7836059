"""The masked-diffusion loss (REFERENCE §3): cross-entropy at the masked target positions only.

The engines are given :class:`DiffusionObjective` as the loss they optimise. Masking itself (which
tokens, their weights) happens when batches are noised, in :mod:`omnidiff.data.tokens.noising`.
"""

from __future__ import annotations

import torch

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.kernels.masked_head import masked_lm_loss


def scored_positions(noised: NoisedBatch, label_shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch_index, hidden_position)`` of every scored token, in ``loss_mask`` order.

    With Dream's label shift the logit at position i predicts token i+1, so a masked token at j
    is read from the hidden state at j-1 (always inside the same sample: a sample's first token
    is the ``<|im_start|>`` prompt, never a target).
    """
    rows, cols = noised.loss_mask.nonzero(as_tuple=True)
    if label_shift:
        if bool((cols == 0).any()) or bool(
            (noised.segment_ids[rows, cols - 1] != noised.segment_ids[rows, cols]).any()
        ):
            raise ValueError("a target token starts its sample; label shift needs a prompt")
        cols = cols - 1
    return rows, cols


class DiffusionObjective:
    """``(hidden [s, b, h], output weight, noised batch) -> loss``: weighted CE at the masked
    positions, through the masked-position head (vocab-parallel under TP)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg

    def __call__(self, hidden: torch.Tensor, output_weight: torch.Tensor,
                 noised: NoisedBatch) -> torch.Tensor:
        rows, cols = scored_positions(noised, self.cfg.label_shift)
        selected = hidden[cols, rows]  # [n, h]
        targets = noised.labels[noised.loss_mask]
        weights = noised.loss_weights[noised.loss_mask]
        return masked_lm_loss(selected, output_weight, targets, weights,
                              chunk_size=self.cfg.head_chunk_size)
