"""megatron-core layer specs: which module implements each part of a transformer layer.

Both specs build the same architecture (pre-norm, GQA with q/k/v bias, SwiGLU, RMSNorm) from the
same megatron-core ``TransformerLayer`` / ``SelfAttention`` / ``MLP``; only the leaf modules
differ. The portable spec runs anywhere (SDPA core attention, an RMSNorm that supports sequence
parallelism); the Transformer Engine spec fuses norm + linear and enables FP8 on GPUs.
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
from omnidiff.kernels.rmsnorm import RMSNorm


class MissingGPUStackError(RuntimeError):
    """The GPU-only path was requested on a machine that cannot run it."""


def portable_layer_spec() -> ModuleSpec:
    """A transformer layer from megatron-core parts that run on CPU and GPU alike."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
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
            pre_mlp_layernorm=RMSNorm,
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

    Uses the ``arbitrary`` mask type so TE takes the same block-diagonal boolean mask as the
    portable path (no causal mask anywhere).
    """
    try:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise MissingGPUStackError(
            "parallel.transformer_engine=true needs the transformer-engine package (CUDA "
            f"build; see the Dockerfile's NGC base image): {err}"
        ) from None
    spec = get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    return spec


def block_spec(num_layers: int, use_transformer_engine: bool) -> TransformerBlockSubmodules:
    """All layers of one (pipeline stage's) block plus the final norm."""
    layer = transformer_engine_layer_spec() if use_transformer_engine else portable_layer_spec()
    final_norm = RMSNorm
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
