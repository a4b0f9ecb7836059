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
    is read from the hidden state at j-1 (inside the same sample: checked when the batch was
    noised). Index arithmetic only: no host synchronisation.
    """
    return noised.scored_rows, noised.scored_cols - int(label_shift)


class DiffusionObjective:
    """``(hidden [s, b, h], output weight, noised batch) -> loss``: weighted CE at the masked
    positions, through the masked-position head (vocab-parallel under TP)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg

    def __call__(self, hidden: torch.Tensor, output_weight: torch.Tensor,
                 noised: NoisedBatch) -> torch.Tensor:
        rows, cols = scored_positions(noised, self.cfg.label_shift)
        selected = hidden[cols, rows]  # [n, h]
        targets = noised.labels[noised.scored_rows, noised.scored_cols]
        weights = noised.loss_weights[noised.scored_rows, noised.scored_cols]
        block = self.cfg.head_vocab_block or (8192 if hidden.is_cuda else 1024)
        return masked_lm_loss(selected, output_weight, targets, weights,
                              chunk_size=self.cfg.head_chunk_size, vocab_block=block)
