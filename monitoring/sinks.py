"""Metric sinks behind one small interface: every sink gets the same flat ``{name: number}``
dict per step. :func:`build_sinks` turns the ``logging`` section into the run's sinks.

A resumed run starts its sinks at the step it resumed from: what was logged after that step
(by the run that was interrupted) is dropped, so no step appears twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from omnidiff.monitoring.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _json_number(value: float) -> float | None:
    """Non-finite values become null: ``NaN`` is not JSON."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class JsonlSink:
    """One JSON object per logged step in ``<output_dir>/metrics.jsonl`` (always on)."""

    def __init__(self, output_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step and self.path.exists():
            kept = [row for row in self.path.read_text().splitlines()
                    if row.strip() and json.loads(row).get("step", 0) <= start_step]
            self.path.write_text("".join(row + "\n" for row in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(),
               **{name: _json_number(value) for name, value in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard scalars under ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: str | Path, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


RUN_FILE = "mlflow_run.json"


def mlflow_sink(cfg: LoggingConfig, output_dir: str | Path, run_name: str,
                params: dict[str, Any] | None = None) -> MetricSink | None:
    """The run's MLflow sink: the configured run, else the one this output folder started
    (so a resumed run continues it), else a new one (logging ``params``); None when the store
    cannot be reached (one warning, training goes on)."""
    from omnidiff.monitoring.tracking import MlflowSink, MlflowTracker, start_run, tracking_uri

    uri = tracking_uri(cfg.mlflow_tracking_uri, output_dir)
    record = Path(output_dir) / RUN_FILE
    run_id = cfg.mlflow_run_id
    if run_id is None and record.is_file():
        run_id = json.loads(record.read_text()).get("run_id")
    created = run_id is None
    if created:
        run_id = start_run(uri, cfg.mlflow_experiment, run_name)
        if run_id is None:
            return None
        record.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    tracker = MlflowTracker(uri, run_id)
    if created and params:
        tracker.log_params(params)
    return MlflowSink(tracker)


def build_sinks(cfg: LoggingConfig, output_dir: str | Path, start_step: int = 0,
                run_name: str = "omnidiff", params: dict[str, Any] | None = None
                ) -> list[MetricSink]:
    """The sinks ``cfg`` asks for (JSONL always), continuing after ``start_step``."""
    sinks: list[MetricSink] = [JsonlSink(output_dir, start_step)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(output_dir, start_step))
    if cfg.mlflow and (sink := mlflow_sink(cfg, output_dir, run_name, params)) is not None:
        sinks.append(sink)
    return sinks


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The JSONL sink's rows, oldest first."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
