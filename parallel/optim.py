"""AdamW and the warm-up + cosine learning-rate schedule of every curriculum stage."""

from __future__ import annotations

import math

import torch

from omnidiff.parallel.config import OptimizerConfig, ScheduleConfig
from omnidiff.parallel.gpu_stack import apex_extension_available


def lr_multiplier(step: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps.

    Linear warm-up over ``warmup_fraction`` of the run (first step already > 0), then cosine
    decay to ``min_lr_ratio`` at the last step.
    """
    warmup = round(schedule.warmup_fraction * schedule.train_steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(schedule.train_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors), the usual Megatron convention."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float],
          eps: float) -> torch.optim.Optimizer:
    """AdamW: apex ``FusedAdam`` for CUDA parameters when built, else torch (fused on CUDA)."""
    on_cuda = any(p.is_cuda for group in param_groups for p in group["params"])
    if on_cuda and apex_extension_available("amp_C"):
        from apex.optimizers import FusedAdam

        return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps,
                             fused=True if on_cuda else None)


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW on the model's device: apex/torch fused kernels on CUDA (see :func:`adamw`)."""
    return adamw(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                 eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer,
                    schedule: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, schedule))
