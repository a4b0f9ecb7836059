"""Start N local worker processes the way torchrun does (env:// rendezvous on loopback).

Used by ``omnidiff train`` when ``parallel.nproc_per_node > 1`` and by the multi-process tests.
Under an external launcher (torchrun, Kubernetes) the environment is already set and nothing
here runs: :func:`launched_externally` tells which case applies.

No worker outlives the launcher: SIGTERM / SIGINT to the launcher are forwarded to every worker
(which then finish their step, save and exit), a launcher that dies takes its workers with it
(torch's spawn sets ``PR_SET_PDEATHSIG``), and a worker that dies takes the others down within
seconds (:data:`FAILURE_GRACE_S` to stop on their own, as much again after SIGTERM, then SIGKILL)
instead of leaving them in a collective that never completes. Workers start with the launcher's
warning filters (a spawned process would otherwise start with Python's defaults).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

FAILURE_GRACE_S = 5.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_externally() -> bool:
    """True when torchrun (or a Kubernetes job) already provides the rendezvous environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, nprocs: int, port: int, warning_filters: list, fn: Callable[..., Any],
            args: tuple) -> None:
    warnings.filters[:] = warning_filters
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
    handlers = {sig: signal.getsignal(sig) for sig in _FORWARDED}
    try:
        context = mp.start_processes(_worker,
                                     args=(nprocs, free_port(), warnings.filters, fn, args),
                                     nprocs=nprocs, join=False, start_method="spawn")

        def forward(signum: int, _frame) -> None:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signum)

        if threading.current_thread() is threading.main_thread():
            for sig in _FORWARDED:
                signal.signal(sig, forward)
        while not context.join(grace_period=FAILURE_GRACE_S):
            pass
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
