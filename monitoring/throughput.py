"""Tokens per second and model FLOP utilisation (MFU), the numbers clusters are judged by."""

from __future__ import annotations

import time

from omnidiff.platform.config import ModelConfig


def flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int,
                    scored_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (Megatron's accounting).

    The output layer only runs at scored positions (``scored_fraction`` of tokens).
    """
    h, layers = model.hidden_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * model.ffn_hidden_size
    body = 6 * layers * per_layer
    attention = 12 * layers * h * seq_length  # QK^T and PV, forward + backward
    head = 6 * h * vocab_size * scored_fraction
    return body + attention + head


class ThroughputMeter:
    """Rolling tokens/s over the steps since the last report."""

    def __init__(self, flops_per_token: float, peak_flops: float | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._tokens = 0
        self._start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        out = {"tokens_per_s": tokens_per_s,
               "model_tflops": tokens_per_s * self.flops_per_token / 1e12}
        if self.peak_flops:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        self._tokens = 0
        self._start = time.perf_counter()
        return out
