"""The released recipe's training step, for the side-by-side against the platform.

The release trains a Hugging Face model class with full-vocabulary logits: every position gets
its [V] logits, Dream's label shift moves them one place, and plain cross-entropy is taken at the
masked positions, under DeepSpeed ZeRO-2 (REFERENCE §4). :class:`ReleasedRecipeEngine` is that
step behind the platform's engine contract, so both arms of the comparison run with the same
data, batches, optimizer, precision and process count; only the approach differs:

* released: HF class (``platform/hf_model.py``) + full logits + CE, DeepSpeed ZeRO-2;
* platform: megatron-core model + masked-position head + the platform's engine.

Run it with ``omnidiff bench released-recipe`` (sweep ``released-recipe`` in
:mod:`omnidiff.jobs.benchmarks.sweeps`): the command supplies the HF model, which lives above
``jobs/`` in the folder stack, runs the arms interleaved in fresh processes and prints
:func:`side_by_side_summary`.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.engines.base import (
    EngineConfig, SkipGuard, StepResult, check_micro_batches)
from omnidiff.parallel.engines.deepspeed_config import deepspeed_config
from omnidiff.parallel.mpu import MegatronMPU
from omnidiff.parallel.optim import build_optimizer, build_scheduler


class FullLogitsLoss(torch.nn.Module):
    """``forward(batch) -> loss`` as released: logits for every position, shifted by one
    (``torch.cat`` of the first column and all but the last), CE at the masked positions,
    weighted by the batch's loss weights (the plain mean over the masked tokens)."""

    def __init__(self, model: torch.nn.Module, label_shift: bool) -> None:
        super().__init__()
        self.model = model
        self.label_shift = label_shift

    def forward(self, batch: NoisedBatch) -> torch.Tensor:
        logits = self.model(batch.input_ids, position_ids=batch.position_ids,
                            segment_ids=batch.segment_ids).logits
        if self.label_shift:  # logit i - 1 predicts token i (Dream)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask = batch.loss_mask
        ce = F.cross_entropy(logits[mask].float(), batch.labels[mask], reduction="none")
        return (ce * batch.loss_weights[mask]).sum()


class ReleasedRecipeEngine:
    """The released step behind :class:`~omnidiff.parallel.engines.base.TrainEngine`:
    ``model`` (an HF-style module returning ``.logits``) under DeepSpeed ZeRO-2, the platform's
    AdamW, schedule and clipping. Data parallel only."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, dims: ParallelDims,
                 label_shift: bool) -> None:
        import deepspeed

        if dims.tp * dims.pp != 1:
            raise ValueError("the released recipe is data-parallel only")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.model = model
        optimizer = build_optimizer(model, cfg.optimizer)
        self.scheduler = build_scheduler(optimizer, cfg.schedule)
        self.ds, *_ = deepspeed.initialize(
            model=FullLogitsLoss(model, label_shift), optimizer=optimizer,
            mpu=MegatronMPU(dims), config=deepspeed_config(cfg, dims, zero_stage=2, clip=True))
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        check_micro_batches(len(micro_batches), self.ds.gradient_accumulation_steps())
        self.ds.train()
        total = 0.0
        for batch in micro_batches:
            loss = self.ds(batch)
            total += float(loss.detach())
            self.ds.backward(loss)
            self.ds.step()
        loss = total / len(micro_batches)
        grad_norm = float(self.ds.get_global_grad_norm())
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.guard.check(loss, grad_norm)
        if not skipped:
            self.scheduler.step()
        return StepResult(loss, grad_norm, lr, skipped, sum(b.num_masked for b in micro_batches))

    def state_dict(self) -> dict:
        raise NotImplementedError("the released-recipe engine is for benchmarks only")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the released-recipe engine is for benchmarks only")


def side_by_side_summary(results: Sequence[dict]) -> str:
    """Median tokens/s (wall and per CPU-second), peak memory of each arm over its repeats, and
    platform / released."""
    arms: dict[str, list[dict]] = {}
    for result in results:
        if result.get("status") == "ok":
            arms.setdefault(result["point"]["engine"], []).append(result)
    if set(arms) != {"released", "platform"}:
        return "side-by-side: an arm has no successful run, no ratio"

    def median(key: str) -> dict[str, float]:
        return {arm: statistics.median(r[key] for r in runs) for arm, runs in arms.items()}

    tokens, cpu, memory = median("tokens_per_s"), median("tokens_per_cpu_s"), \
        median("peak_memory_bytes")
    lines = [f"{arm:<9} tokens/s {tokens[arm]:8.1f}   tokens per CPU-second {cpu[arm]:8.1f}   "
             f"peak memory {memory[arm] / 2**30:6.2f} GiB   ({len(arms[arm])} runs)"
             for arm in ("released", "platform")]
    lines.append(f"platform / released: tokens/s {tokens['platform'] / tokens['released']:.2f}x "
                 f"(per CPU-second {cpu['platform'] / cpu['released']:.2f}x), "
                 f"peak memory {memory['platform'] / memory['released']:.2f}x")
    return "\n".join(lines)
