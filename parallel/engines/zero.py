"""The distributed engine: DeepSpeed (ZeRO 0-3, DP all-reduce) over a megatron-core TP model.

One :meth:`DeepSpeedEngine.train_step` = one optimizer step over the micro-batches this DP rank
was given (DeepSpeed's gradient accumulation). What DeepSpeed does not do is added here:

* the sequence-parallel gradient sum over TP (:mod:`omnidiff.parallel.grad_sync`);
* the gradient norm under TP comes from DeepSpeed with :class:`~omnidiff.parallel.mpu.MegatronMPU`
  (each TP-sharded parameter counted on every TP rank, replicated ones once), except with
  ZeRO stage 0 in fp32, where DeepSpeed clips but never reports the norm nor skips a non-finite
  one: there this engine clips with DeepSpeed's own ``clip_grad_norm_`` (same counting) itself.
  (Stage 0 in bf16/fp16 under TP is refused: see :func:`omnidiff.parallel.dims.check_layout`.)
* a non-finite loss or gradient norm skips the whole step (no parameter, Adam or schedule
  update) and is counted by :class:`~omnidiff.parallel.engines.base.SkipGuard`. ZeRO and the bf16
  optimizer already skip on a non-finite norm; a non-finite loss is made to poison the
  gradients so that the same check sees it on every rank.
* ZeRO-3: the masked head reads the output weight directly, so it is registered as an external
  parameter of the loss module.

The LR schedule is stepped here (only after applied steps), and ``state_dict`` holds this
rank's model shard (none under ZeRO-3, whose fp32 partitions are the weights), its ZeRO
optimizer partition, the schedule and the skip counters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.collectives import all_reduce
from omnidiff.parallel.engines.base import (
    EngineConfig, LossFn, ModelWithLoss, SkipGuard, StepResult, check_micro_batches,
    check_skip_agrees, poison_if_non_finite)
from omnidiff.parallel.engines.deepspeed_config import deepspeed_config
from omnidiff.parallel.engines.deepspeed_state import load_optimizer_state, plain_optimizer_state
from omnidiff.parallel.grad_sync import register_sequence_parallel_grad_sync
from omnidiff.parallel.mpu import MegatronMPU
from omnidiff.parallel.optim import build_optimizer, build_scheduler


class DeepSpeedEngine:
    """:class:`~omnidiff.parallel.engines.base.TrainEngine` on DeepSpeed, for TP x DP (PP = 1)."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, dims: ParallelDims,
                 loss_fn: LossFn) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.model = model
        self.cfg = cfg
        self.dims = dims
        self.mpu = MegatronMPU(dims)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self._sp_hooks = (register_sequence_parallel_grad_sync(model, dims.group("tp"),
                                                               dims.device)
                          if cfg.parallel.sequence_parallel else [])
        # ZeRO and DeepSpeed's bf16 optimizer compute (and skip on) the norm; plain stage 0
        # fp32 hands the step to the torch optimizer, so the norm is taken here.
        self._norm_here = cfg.parallel.zero_stage == 0 and cfg.parallel.precision == "fp32"
        optimizer = build_optimizer(model, cfg.optimizer)
        # Built on the client optimizer: DeepSpeed keeps its param-group dicts, so the lr set
        # by the schedule reaches the (ZeRO-partitioned) update.
        self.scheduler = build_scheduler(optimizer, cfg.schedule)
        loss_module = ModelWithLoss(model, loss_fn)
        if cfg.parallel.zero_stage == 3:
            # The masked head reads this weight outside its module's forward: ZeRO-3 must
            # gather it for the loss module's forward.
            deepspeed.zero.register_external_parameter(loss_module, model.output_layer.weight)
        self.ds, *_ = deepspeed.initialize(
            model=loss_module, optimizer=optimizer, mpu=self.mpu,
            config=deepspeed_config(cfg, dims, zero_stage=cfg.parallel.zero_stage,
                                    clip=not self._norm_here),
        )
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        expected = self.ds.gradient_accumulation_steps()
        check_micro_batches(len(micro_batches), expected)
        self.ds.train()
        total, grad_norm = torch.zeros((), dtype=torch.float64, device=self.dims.device), None
        for index, noised in enumerate(micro_batches):
            loss = self.ds(noised)
            total += loss.detach().double()
            # non-finite so far -> non-finite gradients, so the norm check skips the step
            loss = loss * poison_if_non_finite(total)
            self.ds.backward(loss)
            if self._norm_here and index == expected - 1:
                grad_norm = self._clip_or_discard()  # grads are DP-reduced by now
            self.ds.step()
        loss = self._dp_mean(total / expected)
        if grad_norm is None:
            grad_norm = float(self.ds.get_global_grad_norm())
        skipped = self.guard.check(loss, grad_norm)
        if not self._norm_here:
            check_skip_agrees(self.ds.was_step_applied(), skipped, loss, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if not skipped:
            self.scheduler.step()
        return StepResult(loss, grad_norm, lr, skipped, sum(b.num_masked for b in micro_batches))

    def _clip_or_discard(self) -> float:
        """Stage-0 fp32: TP-aware norm + clip; non-finite -> no gradients, so AdamW is a no-op."""
        from deepspeed.runtime.utils import clip_grad_norm_

        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optimizer.grad_clip or math.inf
        norm = float(clip_grad_norm_(params, clip, mpu=self.mpu))
        if not math.isfinite(norm):
            for p in params:
                p.grad = None
        return norm

    def _dp_mean(self, value: torch.Tensor) -> float:
        """The step's loss averaged over DP: one all-reduce and one host read per step."""
        all_reduce(value, self.dims.group("dp"), self.dims.device, what="DP loss mean")
        return value.item() / self.dims.dp

    # --- checkpoints: this rank's shard of everything -------------------------------------------
    def state_dict(self) -> dict:
        # Under ZeRO-3 the module holds only placeholders: the fp32 partitions are the weights.
        model = self.model.state_dict() if self.cfg.parallel.zero_stage < 3 else None
        return {"model": model, "optimizer": plain_optimizer_state(self.ds.optimizer),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["model"] is not None:
            self.model.load_state_dict(state["model"])
        load_optimizer_state(self.ds, state["optimizer"], self.dims)
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
