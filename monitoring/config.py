"""The config section monitoring consumes: ``logging`` (intervals, progress, metric sinks)."""

from __future__ import annotations

from pydantic import Field

from omnidiff import ConfigSection


class LoggingConfig(ConfigSection):
    log_interval: int = Field(10, gt=0)
    progress_bar: bool = True
    progress_label: str = "train"  # the progress bar's name (the curriculum puts the stage's)
    tensorboard: bool = False
    # peak FLOP/s of one device, the MFU denominator; None: monitoring/peaks.py (the GPU table,
    # or a GEMM measured on this CPU when the run starts, ~2 s)
    mfu_peak: float | None = Field(None, gt=0)
    # MLflow: the URI from here, else MLFLOW_TRACKING_URI, else a SQLite store in output_dir
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "omnidiff"
    mlflow_run_id: str | None = None  # log into this run (the curriculum's stage run)
