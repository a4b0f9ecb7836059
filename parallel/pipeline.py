"""Pipeline parallelism: the train-engine contract on DeepSpeed's ``PipelineModule`` (1F1B).

:class:`PipelineEngine` turns the trainer's list of noised micro-batches into one optimizer step
of DeepSpeed's ``train_batch`` (1F1B schedule, ``gradient_accumulation_steps`` = the number of
micro-batches). The model is cut into stages by :mod:`omnidiff.parallel.pipeline_stages`.

The optimizer always runs as DeepSpeed ZeRO stage 1 (with DP = 1 it shards nothing): that is the
path whose global gradient norm is right under PP x TP (ZeRO takes the TP rank from the pipeline
grid, so replicated norms count once per stage, and sums over all stages) and which skips a step
with non-finite gradients on every rank alike. DeepSpeed's plain fp32 path instead counts
replicated parameters on the first stage only. ZeRO-2/3 do not compose with its pipeline.
A non-finite loss poisons the gradients, so that the same check skips it (as in
:mod:`omnidiff.parallel.deepspeed_engine`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from megatron.core import parallel_state

from omnidiff.parallel import topology
from omnidiff.parallel.grad_sync import register_sequence_parallel_grad_sync
from omnidiff.parallel.pipeline_stages import (
    PARTITION_METHOD, PipelineLoss, loss_inputs, megatron_names, pipeline_layers, stage_inputs,
)
from omnidiff.platform.config import RunConfig
from omnidiff.platform.diffusion import NoisedBatch
from omnidiff.platform.engine import SkipGuard, StepResult
from omnidiff.platform.model import transformer_config
from omnidiff.platform.optim import build_optimizer, build_scheduler


class PipelineSetupError(RuntimeError):
    """The run cannot be laid out as a DeepSpeed pipeline."""


def deepspeed_config(cfg: RunConfig, dp: int) -> dict:
    """DeepSpeed's JSON config for the pipeline (batch sizes, ZeRO-1, precision, clipping)."""
    data = cfg.data
    micro_total = data.micro_batch_size * dp
    if data.global_batch_size % micro_total:
        raise PipelineSetupError(
            f"data.global_batch_size ({data.global_batch_size}) must be a multiple of "
            f"micro_batch_size x data-parallel size ({micro_total})")
    return {
        "train_batch_size": data.global_batch_size,
        "train_micro_batch_size_per_gpu": data.micro_batch_size,
        "gradient_accumulation_steps": data.global_batch_size // micro_total,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": 1, "elastic_checkpoint": False},
        "bf16": {"enabled": cfg.parallel.precision == "bf16"},
        "fp16": {"enabled": cfg.parallel.precision == "fp16"},
        # Partitioned pipe messages split activations over TP ranks; megatron TP needs them whole.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }


def _layout(cfg: RunConfig) -> topology.ParallelDims:
    """The run's TP x PP x DP layout, checked against megatron's groups and DeepSpeed's grid."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if (pp, tp) != (cfg.parallel.pipeline_parallel, cfg.parallel.tensor_parallel):
        raise PipelineSetupError(
            f"megatron parallel_state has PP={pp}, TP={tp} but the config asks for "
            f"pipeline_parallel={cfg.parallel.pipeline_parallel}, "
            f"tensor_parallel={cfg.parallel.tensor_parallel}: call topology.initialize first")
    if pp < 2:
        raise PipelineSetupError("PipelineEngine needs parallel.pipeline_parallel >= 2")
    if cfg.parallel.zero_stage > 1:
        raise PipelineSetupError(
            f"parallel.zero_stage={cfg.parallel.zero_stage} does not compose with DeepSpeed's "
            "pipeline (ZeRO-2/3 partition gradients); use zero_stage 0 or 1")
    dims = topology.ParallelDims(dist.get_world_size(), tp, pp)
    topology.rank_groups(dims)  # raises if DeepSpeed's grid would pair different ranks
    return dims


def _check_partition(module: PipelineModule) -> None:
    """Stage s must own exactly decoder block s (plus the embedding / the output layer)."""
    stages = module.num_stages
    expected = [0, *range(2, stages + 1), stages + 2]
    if list(module.parts) != expected:
        raise PipelineSetupError(f"DeepSpeed partitioned the pipeline layers as "
                                 f"{list(module.parts)}, expected {expected}")


class PipelineEngine:
    """The :class:`~omnidiff.platform.engine.TrainEngine` over a DeepSpeed pipeline.

    Build after ``topology.initialize(tp, pp)``. The parameters are those of ``build_model``
    after ``torch.manual_seed(cfg.seed)``; the global generator is left as it was. All ranks of
    one pipeline must be given the same micro-batches (the trainer seeds them by DP rank).
    """

    def __init__(self, cfg: RunConfig, vocab_size: int) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg = cfg
        dims = _layout(cfg)
        self.dp = dims.dp
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = transformer_config(cfg.model, cfg.parallel)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = PipelineModule(
                layers=pipeline_layers(config, vocab_size, cfg.model.rope_theta, dims.pp,
                                       cfg.parallel.transformer_engine),
                topology=topology.deepspeed_topology(dims), loss_fn=PipelineLoss(cfg.diffusion),
                partition_method=PARTITION_METHOD)
        _check_partition(module)
        self._sp_hooks = (register_sequence_parallel_grad_sync(
            module, parallel_state.get_tensor_model_parallel_group())
            if cfg.parallel.sequence_parallel else [])
        optimizer = build_optimizer(module, cfg.optimizer)
        # DeepSpeed steps this schedule only after applied (finite) steps.
        self.scheduler = build_scheduler(optimizer, cfg.schedule)
        self.ds, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           lr_scheduler=self.scheduler,
                                           config=deepspeed_config(cfg, dims.dp))
        self.model = self.ds.module
        self.names = megatron_names(self.model)
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        expected = self.ds.gradient_accumulation_steps()
        if len(micro_batches) != expected:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; this pipeline "
                             f"runs {expected} per optimizer step")
        lr = self.scheduler.get_last_lr()[0]
        data = iter([(stage_inputs(b), loss_inputs(b)) for b in micro_batches])
        loss = float(self.ds.train_batch(data_iter=data))  # DP mean, on every stage
        grad_norm = float(self.ds.get_global_grad_norm())
        skipped = self.guard.check(loss, grad_norm)
        if self.ds.was_step_applied() == skipped:
            raise RuntimeError(f"DeepSpeed and the skip guard disagree on a step with loss "
                               f"{loss}, grad norm {grad_norm}")
        return StepResult(loss, grad_norm, lr, skipped, sum(b.num_masked for b in micro_batches))

    def state_dict(self) -> dict:
        """This rank's shard: its stage's weights under the PP=1 model's names, ZeRO-1 state."""
        model = {self.names[key]: value for key, value in self.model.state_dict().items()}
        return {"model": model, "optimizer": self.ds.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` of the same rank in the same layout."""
        self.model.load_state_dict({key: state["model"][name] for key, name in self.names.items()})
        # ZeRO reads entry [dp_rank] of a per-DP-rank list; this rank saved its own.
        partitions = [None] * self.dp
        partitions[parallel_state.get_data_parallel_rank()] = state["optimizer"]
        self.ds.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
