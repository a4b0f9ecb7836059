"""Every random generator a training step may draw from, as plain data a checkpoint can hold
(tensors, numbers, lists: loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel import get_cuda_rng_tracker


def rng_state() -> dict:
    """torch (CPU and CUDA), Python, NumPy and megatron's per-TP-rank tracker states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": [version, list(internal), gauss_next],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = get_cuda_rng_tracker()
    if tracker.is_initialized():
        state["tracker"] = dict(tracker.get_states())
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tracker" in state:
        get_cuda_rng_tracker().set_states(state["tracker"])
