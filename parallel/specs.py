"""megatron-core layer specs: which module implements each part of a transformer layer.

Both specs build the same architecture (pre-norm, GQA with q/k/v bias, SwiGLU, RMSNorm) from the
same megatron-core ``TransformerLayer`` / ``SelfAttention`` / ``MLP``; only the leaf modules
differ. The portable spec runs anywhere (SDPA core attention, an RMSNorm that supports sequence
parallelism, apex's fused kernel where built; activation recompute of its own, see
:mod:`omnidiff.parallel.recompute`); the Transformer Engine spec fuses norm + linear and enables
FP8 on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from omnidiff.kernels.attention import PackedSDPAttention
from omnidiff.kernels.rmsnorm import RMSNorm
from omnidiff.parallel.config import ParallelConfig
from omnidiff.parallel.gpu_stack import (
    MissingGPUStackError, apex_extension_available, missing_gpu_stack)
from omnidiff.parallel.recompute import RecomputedSelfAttention, RecomputedTransformerLayer


class ApexRMSNorm(RMSNorm):
    """The portable RMSNorm with apex's fused kernel for CUDA tensors (the reference otherwise).

    Same parameter, same ``sequence_parallel`` tag; apex scales in fp32 and casts once, the
    reference casts before scaling, so bf16 outputs differ by rounding only.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        return super().forward(x)


def portable_norm() -> type[RMSNorm]:
    """The RMSNorm class of the portable spec: apex-fused when apex's kernel is built."""
    return ApexRMSNorm if apex_extension_available("fused_layer_norm_cuda") else RMSNorm


def _layer_spec(layer: type, attention: type, mask_type: AttnMaskType, column: type, row: type,
                core_attention: type, norm: type) -> ModuleSpec:
    """Pre-norm layer: GQA self-attention with q/k/v bias, SwiGLU MLP, from these leaf modules
    (``norm`` is ``IdentityOp`` where the linear that follows fuses it)."""
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=attention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column, core_attention=core_attention, linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column,
                                                                linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def portable_layer_spec() -> ModuleSpec:
    """A transformer layer from megatron-core parts that run on CPU and GPU alike.

    Bidirectional: the block-diagonal packing mask is the only mask.
    """
    return _layer_spec(RecomputedTransformerLayer, RecomputedSelfAttention, AttnMaskType.no_mask,
                       ColumnParallelLinear, RowParallelLinear, PackedSDPAttention,
                       portable_norm())


def transformer_engine_layer_spec() -> ModuleSpec:
    """Transformer Engine layer: fused norm + column-parallel linear, TE attention, FP8-capable.

    megatron's dense TE GPT layer (``get_gpt_layer_with_transformer_engine_spec``), bidirectional:
    the model passes packed rows as THD with ``cu_seqlens`` (``PackedSeqParams``), for which
    megatron's TE wrapper turns ``no_mask`` into TE's ``padding`` mask type, so TE picks a fused
    backend (cuDNN FusedAttention or FlashAttention: each sample attends to itself, nothing is
    computed between samples). An ``arbitrary`` dense mask would force TE's unfused backend.
    The pre-norms are ``IdentityOp`` because TE fuses them into ``linear_qkv`` / ``linear_fc1``.
    Building the spec only names classes; instantiating them needs TE (see
    :func:`transformer_engine_spec`).
    """
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return _layer_spec(TransformerLayer, SelfAttention, AttnMaskType.no_mask,
                       TELayerNormColumnParallelLinear, TERowParallelLinear,
                       TEDotProductAttention, IdentityOp)


@dataclass(frozen=True)
class StackSpec:
    """What a model is built from: one transformer layer's spec and the final norm's class.

    ``rope_in_core_attention``: the core attention rotates queries and keys itself from
    per-token angles (the portable packed path: megatron's own packed RoPE reads the sequence
    lengths back from the device every layer); otherwise megatron applies a position table
    (fused on Transformer Engine).
    """

    layer: ModuleSpec
    final_norm: type
    rope_in_core_attention: bool = False

    def block(self, num_layers: int) -> TransformerBlockSubmodules:
        """``num_layers`` layers (one pipeline stage's, or all) plus the final norm."""
        return TransformerBlockSubmodules(layer_specs=[self.layer] * num_layers,
                                          layer_norm=self.final_norm)


def portable_spec() -> StackSpec:
    return StackSpec(portable_layer_spec(), portable_norm(), rope_in_core_attention=True)


def transformer_engine_spec() -> StackSpec:
    """The TE layer spec; raises :class:`MissingGPUStackError` where TE cannot run."""
    missing = missing_gpu_stack()
    if missing:
        raise MissingGPUStackError("the Transformer Engine spec needs " + " and ".join(missing))
    from megatron.core.extensions.transformer_engine import TENorm

    return StackSpec(transformer_engine_layer_spec(), TENorm)


def layer_spec_for(parallel: ParallelConfig) -> StackSpec:
    """The spec a run's ``parallel`` section asks for (``transformer_engine``)."""
    return transformer_engine_spec() if parallel.transformer_engine else portable_spec()
