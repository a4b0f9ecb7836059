"""The run's metrics logger: fans each step's metrics out to the sinks (the main rank holds
sinks, other ranks an empty list)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omnidiff.monitoring.sinks import MetricSink, read_metrics

__all__ = ["MetricsLogger", "read_metrics"]


class MetricsLogger:
    def __init__(self, sinks: Sequence[MetricSink] = ()) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_folder(self, folder: Path, under: str) -> None:
        """A folder of files (sample grids, audio) to the sinks that keep artefacts (MLflow), as
        the run's ``under``; sinks without artefacts ignore it (the files stay on disk)."""
        for sink in self.sinks:
            if hasattr(sink, "log_folder"):
                sink.log_folder(folder, under)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
