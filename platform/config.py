"""The typed run configuration: one pydantic model per section, loaded from YAML + overrides.

Every knob of a run lives here (megatron-core style: configs, not flags scattered in code).
Bad input never surfaces as a traceback: :func:`load_config` raises :class:`ConfigError`, whose
message is one line per problem, each naming the offending ``section.key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnidiff.platform.presets import MODEL_PRESETS


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
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
            return values  # the Literal check reports it
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


class DiffusionConfig(_Section):
    """The masked-diffusion objective (REFERENCE §3): paper mode and released-code mode."""

    masking: Literal["per_token", "per_sequence"] = "per_token"
    eps: float = Field(1e-3, ge=0, lt=1)
    importance_weighting: bool = False  # LLaDA's 1/t weight; only meaningful per_sequence
    tail_pad: bool = True
    tail_pad_max: int = Field(16, ge=1)
    tail_pad_gamma: float = Field(0.6, ge=0, le=1)
    label_shift: bool = True  # Dream: the logit at position i predicts token i+1
    loss_normalization: Literal["token", "sample"] = "token"
    head_chunk_size: int = Field(1024, gt=0)  # masked positions per LM-head chunk

    @model_validator(mode="after")
    def _check_weighting(self) -> DiffusionConfig:
        if self.importance_weighting and self.masking != "per_sequence":
            raise ValueError("importance_weighting (1/t) needs masking: per_sequence")
        return self


class MediaTokenizerRef(_Section):
    """A media tokenizer on local disk: ``kind`` as registered (see ``data/tokenizers``) + path."""

    kind: str
    path: str


class DataConfig(_Section):
    """Where tokens come from and how they are packed.

    ``synthetic``: the built-in token world (no files). ``shards``: WebDataset media shards,
    decoded by DALI and tokenised on the fly. ``token_shards``: the output of ``omnidiff tokenize``.
    Shard sources are a ``mixture`` file plus the ``stage`` whose ratios are drawn, or ``paths``
    (shard specs read as one source).
    """

    source: Literal["synthetic", "shards", "token_shards"] = "synthetic"
    mixture: str | None = None
    stage: str | None = None
    paths: list[str] = Field(default_factory=list)
    text_tokenizer: str = "byte"  # "byte" (built-in) or a local Hugging Face tokenizer directory
    image_tokenizer: MediaTokenizerRef | None = None
    speech_tokenizer: MediaTokenizerRef | None = None
    image_codebook_size: int = Field(8192, gt=0)
    speech_codebook_size: int = Field(16384, gt=0)
    image_size: int = Field(512, gt=0)  # input images (REFERENCE §2: 512 px -> 1024 codes)
    generated_image_size: int = Field(256, gt=0)  # images an assistant turn generates
    reader_batch_size: int = Field(16, gt=0)  # samples per DALI decode batch
    shuffle_buffer: int = Field(1024, gt=0)
    seq_length: int = Field(3072, gt=8)
    micro_batch_size: int = Field(1, gt=0)
    global_batch_size: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "synthetic":
            return self
        if bool(self.mixture) == bool(self.paths):
            raise ValueError(f"source {self.source} needs exactly one of mixture or paths")
        if self.mixture and not self.stage:
            raise ValueError("a mixture needs stage (the curriculum stage whose ratios to draw)")
        if self.source == "shards" and not (self.image_tokenizer and self.speech_tokenizer):
            raise ValueError("source shards needs image_tokenizer and speech_tokenizer "
                             "({kind, path}; omnidiff fit-tokenizers makes demo ones)")
        return self


class ParallelConfig(_Section):
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
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel needs tensor_parallel > 1")
        if self.fp8 and not self.transformer_engine:
            raise ValueError("fp8 needs transformer_engine: true")
        if self.zero_stage == 3 and self.pipeline_parallel > 1:
            raise ValueError("zero_stage 3 does not compose with pipeline_parallel > 1")
        return self


class OptimizerConfig(_Section):
    """AdamW, as in every stage of the curriculum (REFERENCE §4)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping


class ScheduleConfig(_Section):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x lr."""

    train_steps: int = Field(1000, gt=0)
    warmup_fraction: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class LoggingConfig(_Section):
    log_interval: int = Field(10, gt=0)
    progress_bar: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "omnidiff"
    tensorboard: bool = False


class CheckpointConfig(_Section):
    save_interval: int = Field(0, ge=0)  # 0: save only at the end
    keep_last: int = Field(2, ge=1)
    resume: str = "none"  # "none", "auto" or a checkpoint directory


class RunConfig(_Section):
    """A whole run. ``output_dir`` holds checkpoints, logs and exports."""

    name: str = "omnidiff"
    seed: int = 1234
    output_dir: str = "runs/omnidiff"
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> RunConfig:
        tp = self.parallel.tensor_parallel
        model = self.model
        if model.num_attention_heads % tp:
            raise ValueError(
                f"parallel.tensor_parallel ({tp}) must divide model.num_attention_heads "
                f"({model.num_attention_heads})"
            )
        if model.num_query_groups % tp:
            raise ValueError(
                f"parallel.tensor_parallel ({tp}) must divide model.num_query_groups "
                f"({model.num_query_groups})"
            )
        if model.num_layers % self.parallel.pipeline_parallel:
            raise ValueError(
                f"parallel.pipeline_parallel ({self.parallel.pipeline_parallel}) must divide "
                f"model.num_layers ({model.num_layers})"
            )
        if self.data.global_batch_size % self.data.micro_batch_size:
            raise ValueError(
                f"data.micro_batch_size ({self.data.micro_batch_size}) must divide "
                f"data.global_batch_size ({self.data.global_batch_size})"
            )
        if self.parallel.sequence_parallel and self.data.seq_length % tp:
            raise ValueError(f"parallel.tensor_parallel ({tp}) must divide data.seq_length")
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) onto a nested dict."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {text!r} ({err})") from None
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
            node = child
        node[leaf] = value
    return raw


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or start empty), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return build_config(apply_overrides(raw, list(overrides)))


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
