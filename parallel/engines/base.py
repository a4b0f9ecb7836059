"""The engine contract the trainer drives, and what every engine shares.

An engine owns the model, optimizer and schedule and turns a list of noised micro-batches into
one optimizer step. It is given the loss it optimises (:data:`LossFn`, the objective defined by
the platform) instead of knowing it, and reads only the config sections of :class:`EngineConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from omnidiff import RunStopped
from omnidiff.data.config import DataConfig
from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.parallel.config import ModelConfig, OptimizerConfig, ParallelConfig, ScheduleConfig

# (final hidden states [s, b, h], output-layer weight [V / tp, h], micro-batch) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, NoisedBatch], torch.Tensor]


class EngineConfig(Protocol):
    """The config sections an engine reads (the run config has them all)."""

    seed: int
    model: ModelConfig
    parallel: ParallelConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    data: DataConfig


class NonFiniteError(RunStopped):
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


class ModelWithLoss(torch.nn.Module):
    """Model + loss as one module (``forward(batch) -> loss``) for engines that wrap a module,
    e.g. DeepSpeed: its hooks then see the whole step, including the output weight the
    masked head reads directly."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: NoisedBatch) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.position_ids, batch.segment_ids,
                            batch.cu_seqlens, batch.speech_features, batch.speech_positions)
        return self.loss_fn(hidden, self.model.output_layer.weight, batch)


def host_values(*values: torch.Tensor) -> tuple[float, ...]:
    """Device scalars as Python floats, read together: an engine's one host sync per step."""
    return tuple(float(v) for v in torch.stack([v.double() for v in values]).cpu())


def poison_if_non_finite(value: torch.Tensor) -> torch.Tensor:
    """1 where ``value`` is finite, NaN where not: multiply a loss by it so a non-finite step
    gives non-finite gradients (and is skipped on every rank), without a host sync."""
    return torch.where(torch.isfinite(value), 1.0, float("nan")).to(value.dtype)


def check_micro_batches(given: int, expected: int) -> None:
    if given != expected:
        raise ValueError(f"train_step got {given} micro-batches; this rank accumulates "
                         f"{expected} per optimizer step")


def check_skip_agrees(applied: bool, skipped: bool, loss: float, grad_norm: float) -> None:
    """DeepSpeed skips non-finite steps itself; the guard must reach the same verdict."""
    if applied == skipped:
        raise RuntimeError(f"DeepSpeed and the skip guard disagree on a step with loss {loss}, "
                           f"grad norm {grad_norm}")


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
