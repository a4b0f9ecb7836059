"""Where training metrics go: a JSONL file always, TensorBoard and MLflow when configured.

Only the global rank 0 writes. Every sink gets the same flat ``{name: number}`` dict per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = False,
                 mlflow_run=None) -> None:
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._mlflow = mlflow_run
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
