"""Start N local worker processes the way torchrun does (env:// rendezvous on loopback).

Used by ``omnidiff train`` when ``parallel.nproc_per_node > 1`` and by the multi-process tests.
Under an external launcher (torchrun, Kubernetes) the environment is already set and nothing
here runs: :func:`launched_externally` tells which case applies.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_externally() -> bool:
    """True when torchrun (or a Kubernetes job) already provides the rendezvous environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, nprocs: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # One compute thread per process unless asked otherwise: N processes share the cores.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fn(*args)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes with ranks 0..nprocs-1; re-raise failures.

    ``fn`` must be importable (a module-level function). A failing rank terminates the others
    and its exception is raised here, so a test or the CLI sees the real error.
    """
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    try:
        mp.start_processes(_worker, args=(nprocs, free_port(), fn, args), nprocs=nprocs,
                           join=True, start_method="spawn")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
