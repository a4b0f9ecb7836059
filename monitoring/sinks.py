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
from typing import Protocol

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


def build_sinks(cfg: LoggingConfig, output_dir: str | Path,
                start_step: int = 0) -> list[MetricSink]:
    """The sinks ``cfg`` asks for (JSONL always), continuing after ``start_step``."""
    sinks: list[MetricSink] = [JsonlSink(output_dir, start_step)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(output_dir, start_step))
    return sinks


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The JSONL sink's rows, oldest first."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
