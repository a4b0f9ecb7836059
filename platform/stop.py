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
        self._previous: dict = {}

    def install(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def restore(self) -> None:
        """The handlers from before :meth:`install` (training is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

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
