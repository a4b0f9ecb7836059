"""Graceful shutdown: what SIGTERM (Kubernetes, Slurm) and SIGINT (Ctrl-C) do to a training run.

The first signal only asks: every rank finishes the step it is in, the ranks agree (one small
all-reduce per step, so all stop at the same step), save a checkpoint and exit 0. A second
signal exits at once (the last checkpoint stays intact).
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers; :attr:`signal_name` is set once a stop was asked for."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        if os.environ.get("RANK", "0") == "0":
            print(f"{self.signal_name}: finishing this step, then saving a checkpoint "
                  "(send it again to exit at once)", file=sys.stderr, flush=True)
