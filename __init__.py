"""omnidiff: a distributed training platform for any-to-any multimodal masked-diffusion models.

The package root holds only what every folder shares: the base of the config sections each
folder defines, and the errors a user can cause. Such errors end a command as one line naming
the key, path or sample (never a traceback), with the exit code they carry.
"""

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
