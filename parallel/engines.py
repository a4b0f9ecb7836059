"""Which engine trains a run: the one place the trainer's engine is chosen.

* one process, ``zero_stage`` 0: :class:`~omnidiff.platform.engine.LocalEngine` (plain PyTorch);
* pipeline parallel: ``omnidiff.parallel.pipeline.PipelineEngine`` (DeepSpeed ``PipelineModule``,
  1F1B), which builds its own stage of the model;
* otherwise (TP and/or DP, any ZeRO stage): :class:`DeepSpeedEngine`.

All of them implement :class:`~omnidiff.platform.engine.TrainEngine`.
"""

from __future__ import annotations

import torch.distributed as dist

from omnidiff.parallel import topology
from omnidiff.platform.config import ConfigError, RunConfig
from omnidiff.platform.engine import LocalEngine, TrainEngine
from omnidiff.platform.model import build_model


def check_supported(cfg: RunConfig) -> None:
    """Combinations the engines refuse, as one-line :class:`ConfigError` (before any spawn)."""
    parallel = cfg.parallel
    if parallel.zero_stage == 0 and parallel.precision != "fp32" and parallel.tensor_parallel > 1:
        # DeepSpeed's stage-0 bf16/fp16 optimizer (FP16_UnfusedOptimizer) filters its norm on
        # the gradients' tensor_model_parallel attribute, which only parameters carry: every
        # TP rank but 0 would drop its shards from the clipping norm.
        raise ConfigError(f"parallel.precision {parallel.precision} with tensor_parallel > 1 "
                          "needs zero_stage >= 1 (DeepSpeed's stage-0 low-precision optimizer "
                          "miscounts the gradient norm under tensor parallelism)")


def build_engine(cfg: RunConfig, vocab_size: int) -> TrainEngine:
    """Seed, build the model (this rank's shard) and wrap it in the engine the config needs.

    Seeding is :func:`omnidiff.parallel.topology.seed`: the shards are slices of the TP=1 model
    of the same seed.
    """
    check_supported(cfg)
    topology.seed(cfg.seed)
    if cfg.parallel.pipeline_parallel > 1:
        try:
            from omnidiff.parallel.pipeline import PipelineEngine
        except ModuleNotFoundError as err:
            raise NotImplementedError(
                f"parallel.pipeline_parallel > 1 needs omnidiff.parallel.pipeline ({err})"
            ) from None
        return PipelineEngine(cfg, vocab_size)
    model = build_model(cfg.model, cfg.parallel, vocab_size)
    single = not dist.is_initialized() or dist.get_world_size() == 1
    if single and cfg.parallel.zero_stage == 0:
        return LocalEngine(model, cfg)
    from omnidiff.parallel.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg)
