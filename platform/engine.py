"""The engine contract the trainer drives, and its single-process implementation.

An engine owns the model, optimizer and schedule and turns a list of noised micro-batches into one
optimizer step. The distributed engine (DeepSpeed ZeRO / pipeline, in ``omnidiff.parallel``)
implements the same three methods, so the train loop never changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from omnidiff.platform.config import RunConfig
from omnidiff.platform.diffusion import NoisedBatch, diffusion_loss
from omnidiff.platform.model import OmniDiffusionTransformer
from omnidiff.platform.optim import build_optimizer, build_scheduler


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_masked: int


class TrainEngine(Protocol):
    model: torch.nn.Module

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def model_loss(model: OmniDiffusionTransformer, noised: NoisedBatch, cfg: RunConfig,
               tp_group=None) -> torch.Tensor:
    """Forward one micro-batch through the model and the masked-diffusion objective."""
    hidden = model(noised.input_ids, noised.position_ids, noised.segment_ids)
    return diffusion_loss(hidden, model.output_layer.weight, noised, cfg.diffusion, tp_group)


class DiffusionLoss(torch.nn.Module):
    """Model + objective as one module (``forward(noised) -> loss``) for engines that wrap a
    module, e.g. DeepSpeed: its hooks then see the whole step, including the output weight the
    masked head reads directly."""

    def __init__(self, model: OmniDiffusionTransformer, cfg: RunConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, noised: NoisedBatch) -> torch.Tensor:
        return model_loss(self.model, noised, self.cfg)


class SkipGuard:
    """Counts non-finite steps; stops the run after ``limit`` in a row."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def check(self, loss: float, grad_norm: float) -> bool:
        """True when the step must be skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"norm (loss {loss}, grad norm {grad_norm}); stopping. The last checkpoint is "
                "intact: lower the learning rate or check the data, then resume."
            )
        return True

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = state["total"], state["in_a_row"]


class LocalEngine:
    """Plain PyTorch on one process: accumulate, clip, AdamW step, schedule."""

    def __init__(self, model: OmniDiffusionTransformer, cfg: RunConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for noised in micro_batches:
            loss = model_loss(self.model, noised, self.cfg) / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        clip = self.cfg.optimizer.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.guard.check(total, grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        return StepResult(total, grad_norm, lr, skipped,
                          sum(b.num_masked for b in micro_batches))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
