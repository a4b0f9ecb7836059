"""The typed data-mixture file: named shard sources and, per curriculum stage, a ratio per source.

    sources:
      captions: {shards: ["captions/part-{000000..000099}.tar"]}
      asr:      {shards: ["asr/part-*.tar"]}
    stages:
      stage1: {captions: 1.0}
      stage2: {captions: 0.6, asr: 0.4}

Ratios are relative weights (the released recipe's ``ratio``, REFERENCE §4), normalised per stage;
a source absent from a stage, or at ratio 0, is not drawn in it. Shard specs are paths, brace
ranges or globs, relative to the file's folder.
:class:`omnidiff.data.streams.mixture_sampler.MixtureSampler` draws by these ratios.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnidiff import UserError
from omnidiff.data.media.shards import ShardInfo, list_shards


class MixtureConfigError(UserError, ValueError):
    """A mixture file that does not parse or validate; one line per problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MixtureSource(_Strict):
    shards: list[str] = Field(min_length=1)


class MixtureConfig(_Strict):
    sources: dict[str, MixtureSource] = Field(min_length=1)
    stages: dict[str, dict[str, float]] = Field(min_length=1)
    root: Path = Path(".")  # folder the shard specs are relative to (the file's folder)

    @model_validator(mode="after")
    def _check_stages(self) -> MixtureConfig:
        for stage, ratios in self.stages.items():
            unknown = sorted(set(ratios) - set(self.sources))
            if unknown:
                raise ValueError(f"stages.{stage} names unknown sources {unknown}")
            bad = {name: r for name, r in ratios.items() if not math.isfinite(r) or r < 0}
            if bad:
                raise ValueError(f"stages.{stage}: ratios must be finite and >= 0, got {bad}")
            if not any(r > 0 for r in ratios.values()):
                raise ValueError(f"stages.{stage} has no source with a positive ratio")
        return self

    def ratios(self, stage: str) -> dict[str, float]:
        """The stage's positive ratios, normalised to sum to 1."""
        if stage not in self.stages:
            raise MixtureConfigError(
                f"unknown stage {stage!r}; the mixture has {sorted(self.stages)}")
        positive = {name: r for name, r in self.stages[stage].items() if r > 0}
        total = sum(positive.values())
        return {name: r / total for name, r in positive.items()}

    def shard_specs(self, source: str) -> list[str]:
        """The source's shard specs resolved against :attr:`root` (still unexpanded)."""
        return [str(self.root / spec) for spec in self.sources[source].shards]

    def shards(self, source: str) -> list[ShardInfo]:
        """Expand and inspect a source's shards (ShardError names the first unreadable one)."""
        return list_shards(self.shard_specs(source))


def load_mixture_config(path: str | Path) -> MixtureConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise MixtureConfigError(f"mixture file {path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise MixtureConfigError(f"mixture file {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise MixtureConfigError(f"mixture file {path}: expected a mapping with sources and stages")
    try:
        return MixtureConfig.model_validate({**raw, "root": path.parent})
    except ValidationError as err:
        raise MixtureConfigError("\n".join(
            f"{path}: {'.'.join(map(str, e['loc'])) or 'mixture'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())) from None
