"""The diffusion transformer cut into DeepSpeed pipeline layers, initialised like the PP=1 model.

The pipeline is four kinds of DeepSpeed layers: :class:`EmbeddingPipe` (first stage), one
:class:`DecoderPipe` per stage (a megatron-core ``TransformerBlock`` holding that stage's layers,
numbered globally from megatron's pipeline rank; the last one also holds the final norm) and
:class:`OutputPipe` (last stage). DeepSpeed sends tuples between stages; every stage passes

    ``(hidden [s, b, h] float, position_ids [b, s] int64, segment_ids [b, s] int64)``

so each stage rebuilds its RoPE angles and block-diagonal mask from the two small integer tensors
(``[b, s]``, not the ``[s, b, 1, d]`` angles or the ``[b, 1, s, s]`` mask). DeepSpeed gives received
float tensors ``requires_grad`` and sends their gradients back, integers travel without grad, so
``hidden`` is the only float. The last stage reads what the loss needs (labels, loss mask and
weights) straight from the micro-batch, never through the pipe.

Parameters equal :func:`omnidiff.platform.model.build_model`'s for the same seed: every rank runs
the PP=1 construction order (embedding, layers 1..L, final norm, output layer) and drops the
pieces other stages own (:class:`OrderedBuilder`), so only one foreign piece is alive at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields

import torch
from deepspeed.pipe import LayerSpec
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from omnidiff.kernels.attention import block_diagonal_mask
from omnidiff.kernels.rope import rotary_angles
from omnidiff.parallel.specs import block_spec
from omnidiff.platform.config import DiffusionConfig
from omnidiff.platform.diffusion import NoisedBatch, diffusion_loss

StageTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class EmbeddingPipe(MegatronModule):
    """``(input_ids, position_ids, segment_ids)`` -> ``(hidden, position_ids, segment_ids)``."""

    def __init__(self, config: TransformerConfig, vocab_size: int) -> None:
        super().__init__(config=config)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size, embedding_dim=config.hidden_size,
            init_method=config.init_method, config=config,
            reduce_scatter_embeddings=config.sequence_parallel,
        )

    def forward(self, inputs: StageTensors) -> StageTensors:
        input_ids, position_ids, segment_ids = inputs
        hidden = self.embedding(input_ids)
        if not self.config.sequence_parallel:  # SP's reduce-scatter already transposed
            hidden = hidden.transpose(0, 1).contiguous()
        return hidden, position_ids, segment_ids


class DecoderPipe(MegatronModule):
    """One stage's transformer layers; the last stage's block also applies the final norm."""

    def __init__(self, config: TransformerConfig, num_layers: int, last: bool, rope_theta: float,
                 use_transformer_engine: bool) -> None:
        super().__init__(config=config)
        self.rope_theta = rope_theta
        # pre_process=True: the block takes hidden states as an argument rather than megatron's
        # set_input_tensor (DeepSpeed hands them over); post_process places the final norm.
        self.decoder = TransformerBlock(
            config=config, spec=block_spec(num_layers, use_transformer_engine),
            post_layer_norm=last, pre_process=True, post_process=last,
        )

    def forward(self, inputs: StageTensors) -> StageTensors:
        hidden, position_ids, segment_ids = inputs
        hidden = self.decoder(
            hidden,
            attention_mask=block_diagonal_mask(segment_ids),
            rotary_pos_emb=rotary_angles(position_ids, self.config.kv_channels, self.rope_theta),
        )
        return hidden, position_ids, segment_ids


class OutputPipe(MegatronModule):
    """Owns the output layer; hands the loss the full-sequence hidden states and its weight.

    Returning the weight (rather than logits) keeps the loss at masked positions only
    (:mod:`omnidiff.kernels.masked_head`); its gradient flows straight into the parameter.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int) -> None:
        super().__init__(config=config)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False,
        )

    def forward(self, inputs: StageTensors) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = inputs[0]
        if self.config.sequence_parallel:
            # Backward only splits: the LM head all-reduces its input gradient over TP.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        return hidden, self.output_layer.weight


def stage_inputs(batch: NoisedBatch) -> StageTensors:
    """What the first stage reads from a micro-batch."""
    return batch.input_ids, batch.position_ids, batch.segment_ids


def loss_inputs(batch: NoisedBatch) -> tuple[torch.Tensor, ...]:
    """What the last stage reads from a micro-batch: all of it, as DeepSpeed wants tensors."""
    return tuple(getattr(batch, field.name) for field in fields(batch))


class PipelineLoss:
    """DeepSpeed's ``loss_fn(outputs, labels)``: the masked-diffusion objective.

    A non-finite loss is made to poison the gradients (a NaN factor in backward), so the
    optimizer's non-finite-gradient check skips the step on every stage.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor],
                 labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, weight = outputs
        loss = diffusion_loss(hidden, weight, NoisedBatch(*labels), self.cfg)
        if not bool(torch.isfinite(loss)):
            loss = loss * float("nan")
        return loss


class OrderedBuilder:
    """Builds pipeline layers on demand while replaying the PP=1 model's construction order.

    megatron-core initialises each weight in full from the global CPU generator, so a piece's
    values depend on everything built before it. Asked for piece ``i``, the builder first builds
    and drops pieces it skipped (they belong to earlier stages), then builds ``i``. DeepSpeed asks
    for its stage's layers in increasing order, once each.
    """

    def __init__(self, factories: list[Callable[[], torch.nn.Module]]) -> None:
        self.factories = factories
        self.next = 0

    def build(self, index: int) -> torch.nn.Module:
        if index < self.next:
            raise RuntimeError(f"pipeline layer {index} requested after layer {self.next - 1}: "
                               "layers must be built in increasing order, once each")
        while self.next < index:
            self.factories[self.next]()  # built only to advance the generator as PP=1 does
            self.next += 1
        self.next = index + 1
        return self.factories[index]()


class OrderedLayerSpec(LayerSpec):
    """A DeepSpeed ``LayerSpec`` built through the shared :class:`OrderedBuilder`."""

    def __init__(self, typename: type[torch.nn.Module], builder: OrderedBuilder,
                 index: int) -> None:
        super().__init__(typename)
        self.builder = builder
        self.index = index

    def build(self, log: bool = False) -> torch.nn.Module:
        module = self.builder.build(self.index)
        if not isinstance(module, self.typename):
            raise TypeError(f"pipeline layer {self.index} built a {type(module).__name__}, "
                            f"expected {self.typename.__name__}")
        return module


def pipeline_layers(config: TransformerConfig, vocab_size: int, rope_theta: float,
                    num_stages: int, use_transformer_engine: bool) -> list[OrderedLayerSpec]:
    """Embedding, one decoder block per stage, output layer: in PP=1 construction order."""
    per_stage = config.num_layers // num_stages
    pieces: list[tuple[type[torch.nn.Module], Callable[[], torch.nn.Module]]] = [
        (EmbeddingPipe, lambda: EmbeddingPipe(config, vocab_size))]
    for stage in range(num_stages):
        last = stage == num_stages - 1
        pieces.append((DecoderPipe, lambda last=last: DecoderPipe(
            config, per_stage, last, rope_theta, use_transformer_engine)))
    pieces.append((OutputPipe, lambda: OutputPipe(config, vocab_size)))
    builder = OrderedBuilder([factory for _, factory in pieces])
    return [OrderedLayerSpec(kind, builder, i) for i, (kind, _) in enumerate(pieces)]


# DeepSpeed balances the layers whose class matches; the embedding joins the first stage's block
# and the output layer the last one's.
PARTITION_METHOD = f"type:^{DecoderPipe.__name__}$"

_LOCAL_NAME = re.compile(r"^(\d+)\.(.*)$")
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def megatron_names(module: torch.nn.Module) -> dict[str, str]:
    """``PipelineModule`` state-dict keys of this stage -> the PP=1 model's keys.

    ``"<i>.decoder.layers.<j>.<rest>"`` becomes ``"decoder.layers.<global j>.<rest>"`` (megatron's
    1-based ``layer_number`` is global); embedding, final norm and output layer keep their names.
    """
    names = {}
    for key in module.state_dict():
        index, rest = _LOCAL_NAME.match(key).groups()
        layer = _LAYER_NAME.match(rest)
        if layer:
            local, tail = layer.groups()
            number = module.get_submodule(f"{index}.decoder.layers.{local}").layer_number
            rest = f"decoder.layers.{number - 1}.{tail}"
        names[key] = rest
    return names
