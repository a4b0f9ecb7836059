"""Which engine trains a run: the one place the trainer's engine is chosen.

* one process, ``zero_stage`` 0: :class:`~omnidiff.parallel.engines.local.LocalEngine`;
* pipeline parallel: :class:`~omnidiff.parallel.engines.pipeline.PipelineEngine` (DeepSpeed
  ``PipelineModule``, 1F1B), one stage of the model per rank;
* otherwise (TP and/or DP, any ZeRO stage): :class:`~omnidiff.parallel.engines.zero.
  DeepSpeedEngine`.

All of them implement :class:`~omnidiff.parallel.engines.base.TrainEngine` and optimise the loss
they are given.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from omnidiff.parallel import topology
from omnidiff.parallel.dims import ParallelDims
from omnidiff.parallel.engines.base import EngineConfig, LossFn, TrainEngine
from omnidiff.parallel.model import OmniDiffusionTransformer, build_model, transformer_config
from omnidiff.parallel.resharding import is_weight, load_tp_shard
from omnidiff.parallel.specs import layer_spec_for


def build_engine(cfg: EngineConfig, dims: ParallelDims, vocab_size: int, loss_fn: LossFn,
                 initial_weights: Mapping[str, torch.Tensor] | None = None) -> TrainEngine:
    """Seed, build the model (this rank's shard) and wrap it in the engine the config needs.

    Seeding is :func:`omnidiff.parallel.topology.seed`: the shards are slices of the TP=1 model
    of the same seed. ``initial_weights`` (TP=1 names, e.g. a previous stage's export) replace
    the initialisation before any optimizer exists.
    """
    dims.check_config(cfg.parallel)
    topology.seed(cfg.seed)
    if dims.pp > 1:
        from omnidiff.parallel.engines.pipeline import PipelineEngine

        config = transformer_config(cfg.model, cfg.parallel)
        spec = layer_spec_for(cfg.parallel)

        def build_stage(stage: int) -> OmniDiffusionTransformer:
            return OmniDiffusionTransformer(
                config, vocab_size, cfg.model.rope_theta, spec, pre_process=stage == 0,
                post_process=stage == dims.pp - 1, num_layers=config.num_layers // dims.pp,
                speech_feature_size=cfg.data.heard_feature_size).to(dims.device)

        return PipelineEngine(cfg, dims, loss_fn, build_stage, initial_weights)
    # Built on the host (so TP shards are slices of the TP=1 weights), then moved to this
    # rank's device before any optimizer sees the parameters (fused kernels on CUDA).
    model = build_model(cfg.model, cfg.parallel, vocab_size,
                        speech_feature_size=cfg.data.heard_feature_size)
    if initial_weights is not None:
        names = {key: key for key, value in model.state_dict().items() if is_weight(key, value)}
        load_tp_shard(model, initial_weights, names, dims.tp_rank, dims.tp)
    model = model.to(dims.device)
    if dims.world_size == 1 and cfg.parallel.zero_stage == 0:
        from omnidiff.parallel.engines.local import LocalEngine

        return LocalEngine(model, cfg, loss_fn, dims.micro_batches(cfg.data), dims.device)
    from omnidiff.parallel.engines.zero import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg, dims, loss_fn)
