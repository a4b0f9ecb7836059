"""megatron-core layer specs: which module implements each part of a transformer layer.

Both specs build the same architecture (pre-norm, GQA with q/k/v bias, SwiGLU, RMSNorm) from the
same megatron-core ``TransformerLayer`` / ``SelfAttention`` / ``MLP``; only the leaf modules
differ. The portable spec runs anywhere (SDPA core attention, an RMSNorm that supports sequence
parallelism, apex's fused kernel where built; activation recompute of its own, see
:mod:`omnidiff.parallel.recompute`); the Transformer Engine spec fuses norm + linear and enables
FP8 on GPUs.
"""

from __future__ import annotations

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
from omnidiff.parallel.precision import MissingGPUStackError, missing_gpu_stack, portable_norm
from omnidiff.parallel.recompute import RecomputedSelfAttention, RecomputedTransformerLayer


def portable_layer_spec() -> ModuleSpec:
    """A transformer layer from megatron-core parts that run on CPU and GPU alike."""
    norm = portable_norm()
    return ModuleSpec(
        module=RecomputedTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=RecomputedSelfAttention,
                # Bidirectional: the block-diagonal packing mask is the only mask.
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=PackedSDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transformer_engine_layer_spec() -> ModuleSpec:
    """Transformer Engine layer: fused norm + column-parallel linear, TE attention, FP8-capable.

    megatron's dense TE GPT layer (``get_gpt_layer_with_transformer_engine_spec``) with the
    bidirectional mask: ``arbitrary`` makes TE take the same block-diagonal boolean mask as the
    portable path (True = masked, megatron's convention). TE runs ``arbitrary`` masks in its
    unfused backend (the s x s scores are materialised, like SDPA with a mask); the faster packed
    format is ``thd`` with ``cu_seqlens`` (``PackedSeqParams``, mask type ``padding``), which
    needs the model's forward to pass packing as cumulative lengths instead of a mask.
    The pre-norms are ``IdentityOp`` because TE fuses them into ``linear_qkv`` / ``linear_fc1``.
    Building the spec only names classes; instantiating them needs TE (see :func:`block_spec`).
    """
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                         linear_fc2=TERowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(num_layers: int, use_transformer_engine: bool) -> TransformerBlockSubmodules:
    """All layers of one (pipeline stage's) block plus the final norm."""
    if use_transformer_engine:
        missing = missing_gpu_stack()
        if missing:
            raise MissingGPUStackError("the Transformer Engine spec needs " + " and ".join(missing))
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = transformer_engine_layer_spec(), TENorm
    else:
        layer, final_norm = portable_layer_spec(), portable_norm()
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
