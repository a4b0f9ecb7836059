"""Let megatron-core's tensor/sequence-parallel code run on a machine without CUDA.

Two CUDA assumptions of megatron-core 0.16.1 are met here, and only when CUDA is absent:

* its sequence-parallel all-gather / reduce-scatter (``tensor_parallel.mappings``, the
  column/row-parallel linears, the global memory buffer) allocate their outputs with
  ``device=torch.cuda.current_device()``; gloo runs the collectives fine, so
  :func:`enable` makes that call name the CPU, the only device there is;
* the RNG tracker (``get_cuda_rng_tracker``: named generator states, forked around TP regions
  such as the sequence-parallel block) holds CUDA generator states;
  :class:`CPURNGStatesTracker` keeps the same named states as CPU generator states, and
  :func:`install_rng_tracker` makes megatron use it (megatron's own seeding then fills it).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def enable() -> None:
    """Idempotent; a no-op when CUDA is available."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = _cpu_current_device


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG tracker on CPU generator states (same names, seeds and fork semantics)."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} or seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} was never added (seed the model first)")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_rng_tracker() -> None:
    """Make megatron's ``get_cuda_rng_tracker()`` the CPU tracker (no-op with CUDA)."""
    if torch.cuda.is_available() or isinstance(mcore_random._CUDA_RNG_STATE_TRACKER,
                                               CPURNGStatesTracker):
        return
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
