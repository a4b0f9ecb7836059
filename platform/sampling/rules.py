"""The arithmetic of masked-diffusion sampling (REFERENCE §6), as small pure functions.

Each rule is here once, so the sampler, the evaluation and the tests share it: the timestep
schedule, how many positions a step unmasks, the confidence measures, the position and repeat
penalties, classifier-free guidance and the speech pre-fill offset. They follow the Omni-Diffusion
release (``generation_utils.py``: ``sample_tokens`` and ``_sample``).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

Confidence = Literal["max_prob", "margin", "neg_entropy"]
CONFIDENCES: tuple[str, ...] = ("max_prob", "margin", "neg_entropy")
ENTROPY_EPS = 1e-10  # the release's log(p + 1e-10)


def timesteps(steps: int, eps: float = 1e-3) -> torch.Tensor:
    """``linspace(1, eps, steps + 1)``: step ``i`` goes from ``t = ts[i]`` to ``s = ts[i + 1]``."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)


def transfer_count(masked: int, t: float, s: float, last: bool) -> int:
    """Positions one step unmasks: ``int(masked * (1 - s / t))``, at least one; all on the last."""
    if masked <= 0:
        return 0
    if last:
        return masked
    return min(masked, max(1, int(masked * (1.0 - s / t))))


def penalise(logits: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Shrink logits towards zero by ``factor`` >= 1: negative ones multiplied, positive divided."""
    return torch.where(logits < 0, logits * factor, logits / factor)


def position_penalty_factors(count: int, penalty: float, start: int = 100) -> torch.Tensor:
    """``f_k`` of the ``count`` masked positions in order: 1 before ``start``, then
    ``1 + (k - start) / (count - start) * (penalty - 1)`` (the release's ``max_position_penalty``,
    which discourages committing late image positions early)."""
    factors = torch.ones(count, dtype=torch.float32)
    if penalty != 1.0 and count > start:
        k = torch.arange(start, count, dtype=torch.float32)
        factors[start:] = 1.0 + (k - start) / (count - start) * (penalty - 1.0)
    return factors


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``u + (w + 1)(c - u)``."""
    return uncond + (scale + 1.0) * (cond - uncond)


def boa_offset(length: int, fraction: float) -> int:
    """Where ``<|begin_of_audio|>`` is pre-filled in a generated span of ``length`` tokens."""
    return min(length - 1, int(length * fraction))


def warp(logits: torch.Tensor, temperature: float, top_p: float | None,
         top_k: int | None) -> torch.Tensor:
    """Temperature, then top-p, then top-k (filtered entries become -inf), as the release."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    if top_k is not None and top_k > 0:
        logits = TopKLogitsWarper(min(top_k, logits.shape[-1]))(None, logits)
    return logits


def confidence_of(probs: torch.Tensor, chosen: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position confidence: the chosen token's probability, the top-2 margin, or the
    negative entropy (higher = more certain in every case)."""
    if kind == "max_prob":
        return probs.gather(-1, chosen[:, None])[:, 0]
    if kind == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if kind == "neg_entropy":
        return (probs * torch.log(probs + ENTROPY_EPS)).sum(-1)
    raise ValueError(f"unknown confidence {kind!r}; one of {', '.join(CONFIDENCES)}")


def choose_tokens(probs: torch.Tensor, temperature: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or one categorical draw per row of ``probs`` ``[n, V]``."""
    if temperature > 0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return probs.argmax(-1)
