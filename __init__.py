"""omnidiff: a distributed training platform for any-to-any multimodal masked-diffusion models.

The package root holds only what every folder shares: the base of the config sections each
folder defines, reading a YAML config file, and the errors a user can cause. Such errors end a command as one line naming
the key, path or sample (never a traceback), with the exit code they carry.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

__version__ = "0.1.0"


class UserError(Exception):
    """A failure the user caused or can fix: reported as one line, exit code ``exit_code``."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class RunStopped(UserError):
    """The run stopped itself on purpose (e.g. it diverged); the last checkpoint is intact."""

    exit_code = 3


class ConfigSection(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message in one line: the problem and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: ``{}``); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw
