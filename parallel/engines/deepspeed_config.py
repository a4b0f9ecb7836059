"""The DeepSpeed JSON config of a run: the one builder for the ZeRO and the pipeline engine."""

from __future__ import annotations

from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.engines.base import EngineConfig


def deepspeed_config(cfg: EngineConfig, dims: ParallelDims, *, zero_stage: int, clip: bool,
                     pipeline: bool = False) -> dict:
    """Batch sizes (from ``dims``), ZeRO stage, precision and clipping (off when the engine
    clips itself); ``pipeline`` adds the pipeline engine's message settings."""
    parallel, data = cfg.parallel, cfg.data
    config = {
        "train_batch_size": data.global_batch_size,
        "train_micro_batch_size_per_gpu": data.micro_batch_size,
        "gradient_accumulation_steps": dims.micro_batches(data),
        "gradient_clipping": cfg.optimizer.grad_clip if clip else 0.0,
        "zero_optimization": {"stage": zero_stage, "elastic_checkpoint": False,
                              "overlap_comm": False},
        "zero_allow_untested_optimizer": True,  # the platform's torch AdamW, as LocalEngine
        "bf16": {"enabled": parallel.precision == "bf16"},
        "fp16": {"enabled": parallel.precision == "fp16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if pipeline:
        # Partitioned pipe messages split activations over TP ranks; megatron TP needs them whole.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config
