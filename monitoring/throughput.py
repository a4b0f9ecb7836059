"""Tokens per second and model FLOP utilisation (MFU), the numbers clusters are judged by."""

from __future__ import annotations

import time


class ThroughputMeter:
    """Rolling tokens/s and model TFLOP/s over the steps since the last report; MFU when the
    device peak (FLOP/s, all devices of the run) is known."""

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._tokens = 0
        self._flops = 0.0
        self._start = time.perf_counter()

    def add(self, tokens: int, flops: float) -> None:
        self._tokens += tokens
        self._flops += flops

    def restart(self) -> None:
        """Leave the time since the last report out (it went to evaluation, not training)."""
        self._start = time.perf_counter()

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        out = {"tokens_per_s": self._tokens / elapsed, "model_tflops": self._flops / elapsed / 1e12}
        if self.peak_flops:
            out["mfu"] = self._flops / elapsed / self.peak_flops
        self._tokens, self._flops = 0, 0.0
        self._start = time.perf_counter()
        return out
