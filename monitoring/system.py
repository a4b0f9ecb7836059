"""System metrics of this process, logged with every step's metrics (``system/...``)."""

from __future__ import annotations

import psutil
import torch

_PROCESS = psutil.Process()


def system_metrics() -> dict[str, float]:
    """Resident memory, CPU use since the last call, and CUDA memory where there is a GPU."""
    out = {"system/rss_gib": _PROCESS.memory_info().rss / 2**30,
           "system/cpu_percent": _PROCESS.cpu_percent(interval=None)}
    if torch.cuda.is_available():
        out["system/cuda_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["system/cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
