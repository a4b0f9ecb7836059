"""The config section monitoring consumes: ``logging`` (intervals, progress, metric sinks)."""

from __future__ import annotations

from pydantic import Field

from omnidiff import ConfigSection


class LoggingConfig(ConfigSection):
    log_interval: int = Field(10, gt=0)
    progress_bar: bool = True
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "omnidiff"
    tensorboard: bool = False
