"""Pipeline parallelism: the train-engine contract on DeepSpeed's ``PipelineModule`` (1F1B).

Each stage is the platform's one model class (:class:`~omnidiff.parallel.model.
OmniDiffusionTransformer`) built for that stage (``pre_process`` on the first, ``post_process`` on
the last, its share of the layers), wrapped as one DeepSpeed layer (:class:`StagePipe`).
DeepSpeed sends tuples between stages; every stage passes

    ``(hidden [s, b, h] float, position_ids [b, s] int64, segment_ids [b, s] int64)``

so each stage rebuilds its RoPE angles and block-diagonal mask from the two small integer
tensors. DeepSpeed gives received float tensors ``requires_grad`` and sends their gradients back;
integers travel without grad. The last stage hands the loss its final hidden states and output
weight (so the loss stays at masked positions only); the loss reads labels, mask and weights
straight from the micro-batch, never through the pipe.

Parameters equal the PP=1 model's for the same seed: every rank replays the PP=1 construction
order by building (and dropping) the stages before its own (:class:`OrderedBuilder`).

The optimizer always runs as DeepSpeed ZeRO stage 1 (with DP = 1 it shards nothing): that is the
path whose global gradient norm is right under PP x TP (ZeRO takes the TP rank from the pipeline
grid, so replicated norms count once per stage, and sums over all stages) and which skips a step
with non-finite gradients on every rank alike. A non-finite loss poisons the gradients, so that
the same check skips it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule

from omnidiff.data.tokens.noising import NoisedBatch
from omnidiff.parallel.dims import ParallelDims, deepspeed_topology, rank_groups
from omnidiff.parallel.engines.base import (
    EngineConfig, LossFn, SkipGuard, StepResult, check_micro_batches, check_skip_agrees,
    poison_if_non_finite)
from omnidiff.parallel.engines.deepspeed_config import deepspeed_config
from omnidiff.parallel.engines.deepspeed_state import load_optimizer_state, plain_optimizer_state
from omnidiff.parallel.grad_sync import register_sequence_parallel_grad_sync
from omnidiff.parallel.model import OmniDiffusionTransformer
from omnidiff.parallel.optim import build_optimizer, build_scheduler
from omnidiff.parallel.resharding import is_weight, load_tp_shard



class StagePipe(torch.nn.Module):
    """One pipeline stage as a DeepSpeed layer: tuple in, tuple out."""

    def __init__(self, model: OmniDiffusionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        first, position_ids, segment_ids, *speech = inputs  # speech: first stage only
        hidden = self.model(first, position_ids, segment_ids, None, *speech)
        if self.model.post_process:
            return hidden, self.model.output_layer.weight
        return hidden, position_ids, segment_ids


def stage_inputs(batch: NoisedBatch) -> tuple[torch.Tensor, ...]:
    """What the first stage reads from a micro-batch (ids, positions, segments, speech)."""
    return (batch.input_ids, batch.position_ids, batch.segment_ids, batch.speech_features,
            batch.speech_positions)


def loss_inputs(batch: NoisedBatch) -> tuple[torch.Tensor, ...]:
    """What the last stage reads from a micro-batch: all of it, as DeepSpeed wants tensors."""
    return tuple(getattr(batch, field.name) for field in fields(batch))


class PipelineLoss:
    """DeepSpeed's ``loss_fn(outputs, labels)``: the given loss on the last stage's outputs.

    A non-finite loss is made to poison the gradients (a NaN factor in backward), so the
    optimizer's non-finite-gradient check skips the step on every stage.
    """

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor],
                 labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, weight = outputs
        loss = self.loss_fn(hidden, weight, NoisedBatch(*labels))
        return loss * poison_if_non_finite(loss.detach())


class OrderedBuilder:
    """Builds stages on demand while replaying the PP=1 model's construction order.

    megatron-core initialises each weight in full from the global CPU generator, so a piece's
    values depend on everything built before it. Asked for stage ``i``, the builder first builds
    and drops the stages it skipped (they belong to other ranks), then builds ``i``. DeepSpeed
    asks for its stage's layers in increasing order, once each.
    """

    def __init__(self, factories: list[Callable[[], torch.nn.Module]]) -> None:
        self.factories = factories
        self.next = 0

    def build(self, index: int) -> torch.nn.Module:
        if index < self.next:
            raise RuntimeError(f"pipeline stage {index} requested after stage {self.next - 1}: "
                               "stages must be built in increasing order, once each")
        while self.next < index:
            self.factories[self.next]()  # built only to advance the generator as PP=1 does
            self.next += 1
        self.next = index + 1
        return self.factories[index]()


class OrderedLayerSpec(LayerSpec):
    """A DeepSpeed ``LayerSpec`` built through the shared :class:`OrderedBuilder`."""

    def __init__(self, builder: OrderedBuilder, index: int) -> None:
        super().__init__(StagePipe)
        self.builder = builder
        self.index = index

    def build(self, log: bool = False) -> torch.nn.Module:
        return self.builder.build(self.index)


def stage_layers(build_stage: Callable[[int], OmniDiffusionTransformer],
                 num_stages: int) -> list[OrderedLayerSpec]:
    """One DeepSpeed layer per stage, built in PP=1 construction order."""
    builder = OrderedBuilder([lambda s=s: StagePipe(build_stage(s)) for s in range(num_stages)])
    return [OrderedLayerSpec(builder, s) for s in range(num_stages)]


_STAGE_NAME = re.compile(r"^\d+\.model\.(.*)$")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def megatron_names(module: PipelineModule) -> dict[str, str]:
    """``PipelineModule`` state-dict keys of this stage -> the PP=1 model's keys.

    ``"<stage>.model.decoder.layers.<j>.<rest>"`` becomes ``"decoder.layers.<global j>.<rest>"``
    (megatron's 1-based ``layer_number`` is global); other names lose the stage prefix.
    """
    names = {}
    for key in module.state_dict():
        rest = _STAGE_NAME.match(key).group(1)
        layer = _LAYER_NAME.match(rest)
        if layer:
            local, tail = layer.groups()
            prefix = key[: -len(rest)]
            number = module.get_submodule(f"{prefix}decoder.layers.{local}").layer_number
            rest = f"decoder.layers.{number - 1}.{tail}"
        names[key] = rest
    return names


class PipelineEngine:
    """The :class:`~omnidiff.parallel.engines.base.TrainEngine` over a DeepSpeed pipeline.

    Build after ``topology.initialize(tp, pp)``, with ``build_stage(s)`` making stage ``s`` of
    the model. The parameters are those of the PP=1 model after ``torch.manual_seed(cfg.seed)``;
    the global generator is left as it was. All ranks of one pipeline must be given the same
    micro-batches (the trainer seeds them by DP rank).
    """

    def __init__(self, cfg: EngineConfig, dims: ParallelDims, loss_fn: LossFn,
                 build_stage: Callable[[int], OmniDiffusionTransformer],
                 initial_weights: Mapping[str, torch.Tensor] | None = None) -> None:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        dims.check_config(cfg.parallel)
        rank_groups(dims)  # raises if DeepSpeed's grid would pair different ranks
        self.cfg, self.dims = cfg, dims
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = PipelineModule(layers=stage_layers(build_stage, dims.pp),
                                    topology=deepspeed_topology(dims),
                                    loss_fn=PipelineLoss(loss_fn), partition_method="uniform")
        if list(module.parts) != list(range(dims.pp + 1)):
            raise RuntimeError(f"DeepSpeed partitioned the pipeline as {list(module.parts)}, "
                               f"expected one stage per rank {list(range(dims.pp + 1))}")
        if initial_weights is not None:
            names = {key: name for key, name in megatron_names(module).items()
                     if is_weight(key, module.state_dict()[key])}
            load_tp_shard(module, initial_weights, names, dims.tp_rank, dims.tp)
        self._sp_hooks = (register_sequence_parallel_grad_sync(module, dims.group("tp"),
                                                               dims.device)
                          if cfg.parallel.sequence_parallel else [])
        optimizer = build_optimizer(module, cfg.optimizer)
        # DeepSpeed steps this schedule only after applied (finite) steps.
        self.scheduler = build_scheduler(optimizer, cfg.schedule)
        self.ds, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=self.scheduler,
            config=deepspeed_config(cfg, dims, zero_stage=1, clip=True, pipeline=True))
        self.model = self.ds.module
        self.names = megatron_names(self.model)
        self.guard = SkipGuard()

    def train_step(self, micro_batches: Sequence[NoisedBatch]) -> StepResult:
        check_micro_batches(len(micro_batches), self.ds.gradient_accumulation_steps())
        lr = self.scheduler.get_last_lr()[0]
        data = iter([(stage_inputs(b), loss_inputs(b)) for b in micro_batches])
        loss = float(self.ds.train_batch(data_iter=data))  # DP mean, on every stage
        grad_norm = float(self.ds.get_global_grad_norm())
        skipped = self.guard.check(loss, grad_norm)
        check_skip_agrees(self.ds.was_step_applied(), skipped, loss, grad_norm)
        return StepResult(loss, grad_norm, lr, skipped, sum(b.num_masked for b in micro_batches))

    def state_dict(self) -> dict:
        """This rank's shard: its stage's weights under the PP=1 model's names, ZeRO-1 state."""
        model = {self.names[key]: value for key, value in self.model.state_dict().items()}
        return {"model": model, "optimizer": plain_optimizer_state(self.ds.optimizer),
                "scheduler": self.scheduler.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` of the same rank in the same layout."""
        self.model.load_state_dict({key: state["model"][name] for key, name in self.names.items()})
        load_optimizer_state(self.ds, state["optimizer"], self.dims)
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.load_state_dict(state["guard"])
