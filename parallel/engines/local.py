"""The single-process engine: plain PyTorch accumulate, clip, AdamW step, schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.parallel.engines.base import (
    EngineConfig, LossFn, ModelWithLoss, SkipGuard, StepResult, check_micro_batches, host_values)
from omnidiff.parallel.optim import build_optimizer, build_scheduler


class LocalEngine:
    """:class:`~omnidiff.parallel.engines.base.TrainEngine` on one process, no DeepSpeed."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, loss_fn: LossFn,
                 micro_batches: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.cfg = cfg
        self.step_loss = ModelWithLoss(model, loss_fn)
        self.micro_batches = micro_batches
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        check_micro_batches(len(micro_batches), self.micro_batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            loss = self.step_loss(batch) / len(micro_batches)
            loss.backward()
            total += loss.detach().double()
        clip = self.cfg.optimizer.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        loss_value, grad_norm = host_values(total, norm)  # the step's one host sync
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.guard.check(loss_value, grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        return StepResult(loss_value, grad_norm, lr, skipped,
                          sum(b.num_masked for b in micro_batches))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
