"""Curriculum job definitions: a job is a sequence of stages, each a run config.

A job file (YAML, see ``jobs/curricula/``) holds run-config keys every stage shares (``run``),
one entry per stage with the keys that stage changes, where stage 1 starts from (``init``, an
Hugging Face folder such as Dream-7B, or nothing), what the job prepares for itself when it is
missing (``prepare``: the demo dataset and tokenizers), and where it runs on a cluster
(``cluster``, consumed by ``k8s/``); ``extends`` names a job this one changes. Stage ``n + 1``
always starts from stage ``n``'s final weights with a fresh optimizer and schedule; the
curriculum runner (``platform/curriculum.py``) does that.

This module only reads and merges definitions; the run configs are validated by the platform
when a stage starts, the cluster section by ``k8s/``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from omnidiff import ConfigError, ConfigSection, read_yaml_mapping

JOBS_DIR = Path(__file__).resolve().parent / "curricula"


class StageSpec(ConfigSection):
    """One curriculum stage: a name and the run-config keys it sets on top of the job's."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)
    run: dict[str, Any] = Field(default_factory=dict)


class InitSpec(ConfigSection):
    """Where stage 1's weights come from: a Hugging Face folder (Dream or stock Qwen2 format);
    vocabulary rows the folder lacks are initialised as ``new_rows`` says."""

    hf: str
    new_rows: Literal["normal", "mean"] = "normal"


class PrepareSpec(ConfigSection):
    """Data a job builds itself when missing (the demo): shards, then fitted tokenizers."""

    demo_data: str  # output folder of `omnidiff demo-data`
    samples: int = Field(3000, gt=0)
    tokenizers: str  # output folder of `omnidiff fit-tokenizers`
    image_codes: int = Field(512, gt=0)
    speech_codes: int = Field(512, gt=0)
    image_size: int = Field(64, gt=0)
    generated_image_size: int = Field(32, gt=0)
    speech_encoder: str | None = None  # a small demo SenseVoice (continuous speech input) here
    # > 0: a byte-level BPE text tokenizer of this size fitted to the demo's texts, in
    # <tokenizers>/text (data.text_tokenizer); 0: the runs use the byte tokenizer
    text_vocab: int = Field(0, ge=0)
    # a held-out demo set in <demo_data>/heldout (other seed, same tasks), for evaluation.mixture
    heldout_samples: int = Field(0, ge=0)

    @field_validator("text_vocab")
    @classmethod
    def _bpe_size(cls, size: int) -> int:
        """Refused here, not after minutes of fitting the media tokenizers first."""
        from omnidiff.data.tokenizers.demo_text import MIN_TEXT_VOCAB

        if 0 < size < MIN_TEXT_VOCAB:
            raise ValueError(f"a byte-level BPE needs at least {MIN_TEXT_VOCAB} entries (256 "
                             f"bytes, the chat specials, merges); 0 keeps the byte tokenizer")
        return size


class JobConfig(ConfigSection):
    """A curriculum job: shared run config, stages in order, init, preparation, cluster."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=40)
    output_dir: str
    run: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)
    init: InitSpec | None = None
    prepare: PrepareSpec | None = None
    export: bool = True  # an HF folder at the end of every stage
    cluster: dict[str, Any] = Field(default_factory=dict)  # validated by k8s/

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return stages

    def stage_dir(self, index: int) -> Path:
        return Path(self.output_dir) / self.stages[index].name

    def stage_run_config(self, index: int) -> dict[str, Any]:
        """The raw run config of stage ``index``: the job's keys, then the stage's, then its
        name and output folder."""
        stage = self.stages[index]
        raw = deep_merge(self.run, stage.run)
        raw["name"] = f"{self.name}-{stage.name}"
        raw["output_dir"] = str(self.stage_dir(index))
        return raw


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, nested mappings merged key by key (inputs unchanged)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_job_path(spec: str | Path) -> Path:
    """A job file path, or the name of a built-in job (``demo``, ``omni-diffusion``)."""
    path = Path(spec)
    if path.is_file():
        return path
    builtin = JOBS_DIR / f"{spec}.yaml"
    if builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in JOBS_DIR.glob("*.yaml")))
    raise ConfigError(f"job {spec}: no such file, and not a built-in job ({known})")


def read_job(path: Path, extending: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A job file's mapping on top of the job it ``extends`` (a built-in job name, or a file
    path as given or beside the extending file): keys merged as :func:`deep_merge` does, and
    ``stages`` by name (a stage named as one of the base's merges into it, in the base's order;
    other names are appended)."""
    raw = read_yaml_mapping(path)
    base_spec = raw.pop("extends", None)
    if base_spec is None:
        return raw
    if not isinstance(base_spec, str):
        raise ConfigError(f"{path}: extends: a job file or a built-in job name")
    beside = path.parent / base_spec
    base_path = resolve_job_path(beside if beside.is_file() else base_spec)
    if base_path.resolve() in (*extending, path.resolve()):
        raise ConfigError(f"{path}: extends: {base_spec} leads back to this job")
    base = read_job(base_path, (*extending, path.resolve()))
    stages = raw.pop("stages", [])
    merged = deep_merge(base, raw)
    if stages:
        merged["stages"] = _merge_stages(base.get("stages", []), stages, path)
    return merged


def _merge_stages(base: list, extra: list, path: Path) -> list:
    if not isinstance(extra, list) or not all(isinstance(s, dict) for s in [*base, *extra]):
        raise ConfigError(f"{path}: stages: a list of stages ({{name, run}} mappings)")
    merged = [copy.deepcopy(stage) for stage in base]
    names = [stage.get("name") for stage in merged]
    for stage in extra:
        if stage.get("name") in names:
            at = names.index(stage["name"])
            merged[at] = deep_merge(merged[at], stage)
        else:
            merged.append(copy.deepcopy(stage))
    return merged


def load_job(spec: str | Path) -> JobConfig:
    """Read and validate a job file; errors are one line per problem naming the key."""
    path = resolve_job_path(spec)
    raw = read_job(path)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'job'}: "
                    f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                    for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
