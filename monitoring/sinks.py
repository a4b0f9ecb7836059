"""Metric sinks behind one small interface: every sink gets the same flat ``{name: number}``
dict per step. :func:`build_sinks` turns the ``logging`` section into the run's sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from omnidiff.monitoring.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per logged step in ``<output_dir>/metrics.jsonl`` (always on)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard scalars under ``<output_dir>/tensorboard``."""

    def __init__(self, output_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def build_sinks(cfg: LoggingConfig, output_dir: str | Path) -> list[MetricSink]:
    """The sinks ``cfg`` asks for; JSONL always."""
    sinks: list[MetricSink] = [JsonlSink(output_dir)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(output_dir))
    return sinks


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The JSONL sink's rows, oldest first."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
