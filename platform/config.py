"""The run configuration: the sections each folder defines, composed; loaded from YAML + overrides.

Every knob of a run lives in a typed section (megatron-core style: configs, not flags scattered in
code), defined by the folder that consumes it: ``data`` and ``diffusion`` (``data/config.py``),
``model``, ``parallel``, ``optimizer``, ``schedule`` (``parallel/config.py``), ``logging``
(``monitoring/config.py``), ``checkpoint`` (here). Bad input never surfaces as a traceback:
:func:`load_config` raises :class:`ConfigError`, whose message is one line per problem, each
naming the offending ``section.key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from omnidiff import ConfigError, ConfigSection, read_yaml_mapping, yaml_problem
from omnidiff.data.config import DataConfig, DiffusionConfig, MediaTokenizerRef
from omnidiff.monitoring.config import LoggingConfig
from omnidiff.parallel.config import ModelConfig, OptimizerConfig, ParallelConfig, ScheduleConfig
from omnidiff.parallel.dims import check_layout

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig", "EvalConfig",
           "LoggingConfig", "SamplerConfig",
           "MediaTokenizerRef", "ModelConfig", "OptimizerConfig", "ParallelConfig", "RunConfig",
           "ScheduleConfig", "build_config", "dump_config", "load_config"]


class CheckpointConfig(ConfigSection):
    save_interval: int = Field(0, ge=0)  # 0: save only at the end
    keep_last: int = Field(2, ge=1)
    resume: str = "none"  # "none", "auto" or a checkpoint directory
    # weights to start from when there is nothing to resume: a Hugging Face folder (Dream,
    # stock Qwen2, or an omnidiff export); vocabulary rows it lacks are initialised by init_new_rows
    init_from: str | None = None
    init_new_rows: Literal["normal", "mean"] = "normal"
    # when the run reaches its last step: its final checkpoint as a Hugging Face folder here
    # (what the next curriculum stage starts from, on a laptop or a cluster alike)
    export_dir: str | None = None


class SamplerConfig(ConfigSection):
    """How to sample; per-task defaults of the release live with the task prompts."""

    steps: int = Field(64, gt=0)  # a request's own ``steps`` (a task default) wins over this
    eps: float = Field(1e-3, gt=0, lt=1)
    confidence: Literal["max_prob", "margin", "neg_entropy"] = "neg_entropy"
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    position_penalty: float = Field(1.0, ge=1)  # P of REFERENCE §6; the release uses 2 for images
    penalty_start: int = Field(100, ge=0)  # masked-position index where the penalty begins
    repeat_penalty: float = Field(1.0, ge=1)  # on tokens already in the row (release: 1.2-1.5)
    guidance: float = Field(0.0, ge=0)  # classifier-free guidance scale w; 0 disables
    block_size: int | None = Field(None, gt=0)  # semi-autoregressive blocks; None: one block
    label_shift: bool = True


# How image answers are sampled unless asked otherwise (``omnidiff sample``, the evaluation): the
# release's position penalty, and temperature sampling among the 20 likeliest codes: greedy
# confidence-first decoding fills a scene with its likeliest code, the background (demo, end of
# stage 3, 64 held-out scene prompts: the caption's colour is the main one of 7 greedy images,
# of 24-26 sampled ones over 4 seeds; of 48 decoded references).
IMAGE_SAMPLING = {"position_penalty": 2.0, "temperature": 1.0, "top_k": 20}


class EvalConfig(ConfigSection):
    """Held-out evaluation (:mod:`omnidiff.platform.evaluation`): how to sample and score, and,
    during training, which held-out data and how often."""

    sampler: SamplerConfig = Field(default_factory=lambda: SamplerConfig(steps=16))
    image_sampler: SamplerConfig = Field(  # text-to-image and speech-to-image answers
        default_factory=lambda: SamplerConfig(steps=16, **IMAGE_SAMPLING))
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    text_slack: int = Field(4, ge=0)  # extra answer masks beyond the reference's length
    max_artifacts: int = Field(4, ge=0)  # images / WAVs kept per task
    # a held-out media mixture (same schema as data.mixture, e.g. the demo's heldout/mixture.yaml);
    # None: no evaluation during training. Its sources with a ratio in the run's data.stage are
    # evaluated, samples_per_task each (the first ones of each source, always the same).
    mixture: str | None = None
    samples_per_task: int = Field(8, gt=0)
    interval: int = Field(0, ge=0)  # every N steps as well as at the run's end; 0: end only


class RunConfig(ConfigSection):
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
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_cross_section(self) -> RunConfig:
        check_layout(self.model, self.parallel, self.data)
        return self

    @model_validator(mode="after")
    def _check_evaluation(self) -> RunConfig:
        if not self.evaluation.mixture:
            return self
        if not (self.data.image_tokenizer and self.data.speech_tokenizer):
            raise ValueError("evaluation.mixture reads media shards: it needs "
                             "data.image_tokenizer and data.speech_tokenizer")
        if not self.data.stage:
            raise ValueError("evaluation.mixture needs data.stage (whose tasks to evaluate)")
        if self.parallel.pipeline_parallel > 1 or self.parallel.zero_stage == 3:
            raise ValueError("evaluation during training samples the whole model on each rank: "
                             "it needs pipeline_parallel 1 and zero_stage < 3 (evaluate the "
                             "export with omnidiff sample instead)")
        if self.data.speech_input == "continuous":
            raise ValueError("evaluation.mixture: the sampler feeds speech as codes; it does not "
                             "take continuous speech input yet")
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
            raise ConfigError(f"override {key}: cannot parse value {text!r} "
                              f"({yaml_problem(err)})") from None
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
    raw = read_yaml_mapping(path) if path is not None else {}
    return build_config(apply_overrides(raw, list(overrides)))


def dump_config(config: RunConfig) -> str:
    """The fully resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
