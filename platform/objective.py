"""The masked-diffusion loss (REFERENCE §3): cross-entropy at the masked target positions only.

The engines are given :class:`DiffusionObjective` as the loss they optimise. Masking itself (which
tokens, their weights) happens when batches are noised, in :mod:`omnidiff.data.tokens.noising`.
"""

from __future__ import annotations

import torch

from omnidiff.data.config import DiffusionConfig
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.data.tokens.tasks import TASKS
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
    positions, through the masked-position head (vocab-parallel under TP).

    With :attr:`collect` set it also sums, per task, the masked tokens' cross-entropy and
    top-1 hits the head computes anyway (device tensors; :meth:`take_stats` hands them over).
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.collect = False
        self._stats: torch.Tensor | None = None  # [3, tasks + 1]: count, CE sum, hits

    def take_stats(self) -> torch.Tensor | None:
        stats, self._stats = self._stats, None
        return stats

    def _add_stats(self, rows: list, tasks: torch.Tensor) -> None:
        if not rows:
            return
        ce = torch.cat([row[0] for row in rows]).double()
        hit = torch.cat([row[1] for row in rows]).double()
        index = (tasks.to(ce.device) + 1).clamp(min=0)  # 0: unknown task
        stats = torch.zeros(3, len(TASKS) + 1, dtype=torch.float64, device=ce.device)
        for row, values in enumerate((torch.ones_like(ce), ce, hit)):
            stats[row].index_add_(0, index, values)
        self._stats = stats if self._stats is None else self._stats + stats

    def __call__(self, hidden: torch.Tensor, output_weight: torch.Tensor,
                 noised: NoisedBatch) -> torch.Tensor:
        rows, cols = scored_positions(noised, self.cfg.label_shift)
        selected = hidden[cols, rows]  # [n, h]
        targets = noised.labels[noised.scored_rows, noised.scored_cols]
        weights = noised.loss_weights[noised.scored_rows, noised.scored_cols]
        block = self.cfg.head_vocab_block or (8192 if hidden.is_cuda else 1024)
        rows_stats: list | None = [] if self.collect else None
        loss = masked_lm_loss(selected, output_weight, targets, weights,
                              chunk_size=self.cfg.head_chunk_size, vocab_block=block,
                              stats=rows_stats)
        if rows_stats is not None:
            self._add_stats(rows_stats, noised.scored_tasks)
        return loss
