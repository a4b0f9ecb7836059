"""Activation recomputation (``parallel.recompute: none | selective | full``) on CPU and GPU.

megatron-core recomputes through ``tensor_parallel.checkpoint``, which saves and restores the CUDA
RNG state and so needs CUDA even when every tensor is on the CPU. The two specs therefore
recompute differently, at the same granularities:

- Transformer Engine spec (GPU only): megatron's own path (``recompute_granularity``). It also
  replays megatron's model-parallel RNG tracker and, under FP8, reuses the forward's scaling
  factors (``te_checkpoint``), which a generic checkpoint would not.
- Portable spec (CPU and GPU): ``torch.utils.checkpoint`` (non-reentrant) inside the layer and
  attention modules of the spec. RNG replay is exact: the portable modules only draw from the
  default CPU/CUDA generators (SDPA and hidden dropout), which torch's checkpoint restores.

``full`` keeps only each layer's input and recomputes the whole layer in backward (megatron's
``recompute_method=uniform, recompute_num_layers=1``); ``selective`` recomputes only core
attention (megatron's ``recompute_modules=["core_attn"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.utils.checkpoint import checkpoint

RecomputeMode = Literal["none", "selective", "full"]

_MEGATRON_RECOMPUTE: dict[str, dict] = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1},
}


@dataclass
class OmniTransformerConfig(TransformerConfig):
    """megatron's ``TransformerConfig`` plus the recompute mode the portable spec applies itself.

    It travels with the config, so every block built from it (whole model or one pipeline
    stage) recomputes alike without extra arguments.
    """

    portable_recompute: RecomputeMode = "none"


def recompute_settings(mode: RecomputeMode, megatron_native: bool) -> dict:
    """``TransformerConfig`` keyword arguments for ``mode``: megatron's keys or the portable one."""
    if megatron_native:
        return dict(_MEGATRON_RECOMPUTE[mode])
    return {"portable_recompute": mode}


def portable_recompute(config: TransformerConfig) -> RecomputeMode:
    """The portable mode of ``config`` ("none" for a plain megatron ``TransformerConfig``)."""
    return getattr(config, "portable_recompute", "none")


class RecomputedTransformerLayer(TransformerLayer):
    """megatron's ``TransformerLayer``, checkpointed as a whole under ``full`` recompute."""

    def forward(self, *args, **kwargs):
        if portable_recompute(self.config) == "full" and self.training:
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


class RecomputedSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` whose core attention is recomputed under ``selective``.

    megatron already routes core attention through ``_checkpointed_attention_forward`` when
    ``checkpoint_core_attention`` is set (training only); only the checkpoint itself changes.
    """

    def __init__(self, config: TransformerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        if portable_recompute(config) == "selective":
            self.checkpoint_core_attention = True

    def _checkpointed_attention_forward(self, query, key, value, attention_mask,
                                        rotary_pos_emb=None, attn_mask_type=None,
                                        attention_bias=None, packed_seq_params=None):
        return checkpoint(self.core_attention, query, key, value, attention_mask,
                          attn_mask_type=attn_mask_type or self.attn_mask_type,
                          attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                          use_reentrant=False)
