"""The config sections the parallel engine consumes: ``model`` (transformer shape),
``parallel`` (layout and numerics), ``optimizer`` and ``schedule``.

Checks that span sections (TP must divide the heads, ...) live with the layout, in
:mod:`omnidiff.parallel.dims`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from omnidiff import ConfigSection
from omnidiff.parallel.presets import MODEL_PRESETS


class ModelConfig(ConfigSection):
    """Transformer shape. ``preset`` fills every key not given explicitly."""

    preset: Literal["dream-7b", "small", "tiny", "custom"] = "tiny"
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    rope_theta: float = Field(1_000_000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    qkv_bias: bool = True
    init_std: float = Field(0.02, gt=0)
    max_position_embeddings: int = Field(32_768, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        preset = values.get("preset", "tiny")
        if preset != "custom" and preset not in MODEL_PRESETS:
            known = ", ".join([*MODEL_PRESETS, "custom"])
            raise ValueError(f"unknown model.preset {preset!r} (one of {known})")
        base = dict(MODEL_PRESETS.get(preset, {}))
        base.update(values)
        return base

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ParallelConfig(ConfigSection):
    """Process topology and numerics. Data parallelism is whatever the world size leaves."""

    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    sequence_parallel: bool = False
    zero_stage: int = Field(0, ge=0, le=3)
    nproc_per_node: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    recompute: Literal["none", "selective", "full"] = "none"
    transformer_engine: bool = False
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _check_combinations(self) -> ParallelConfig:
        if self.fp8 and not self.transformer_engine:
            raise ValueError("fp8 needs transformer_engine: true")
        return self


class OptimizerConfig(ConfigSection):
    """AdamW, as in every stage of the curriculum (REFERENCE §4)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping


class ScheduleConfig(ConfigSection):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x lr."""

    train_steps: int = Field(1000, gt=0)
    warmup_fraction: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
