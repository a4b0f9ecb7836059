"""Mixture sampling: interleave several sample sources by ratio, deterministic and resumable.

Each draw picks a source with probability proportional to its ``ratio`` (the curriculum's data
mixtures, REFERENCE §4) from a seeded NumPy generator, then takes that source's next sample. A
source that runs out is restarted for its next pass (``factory(pass_index)``, so it can reshuffle
per pass): the mixture is endless and the trainer decides how many samples it takes.

Resuming needs no cooperation from the sources: the state is the generator state plus, per
source, the pass index and how many samples of that pass were taken; on load each source is
re-created and fast-forwarded by that many samples. A source whose iterator has
``state_dict``/``load_state_dict`` (an endless media reader, say) is saved and restored through
them instead, so resuming it costs nothing.

The ratios of each curriculum stage come from a mixture file (:mod:`omnidiff.data.streams.mixture`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import numpy as np

from omnidiff import UserError

T = TypeVar("T")
SourceFactory = Callable[[int], Iterable[T]]
_END = object()


class MixtureError(UserError, ValueError):
    """A bad mixture: unknown or empty source, bad ratio, state of another mixture."""


class MixtureSampler(Generic[T]):
    """Endless iterator of ``(source_name, sample)`` drawn by ratio from ``sources``.

    ``sources`` maps a name to a factory ``pass_index -> iterable``; sources absent from
    ``ratios`` (or with ratio 0) are never drawn, so one ``sources`` dict serves every stage.
    """

    def __init__(self, sources: Mapping[str, SourceFactory], ratios: Mapping[str, float],
                 seed: int = 0) -> None:
        unknown = sorted(set(ratios) - set(sources))
        if unknown:
            raise MixtureError(f"ratios name unknown sources {unknown}")
        bad = {name: r for name, r in ratios.items() if not np.isfinite(r) or r < 0}
        if bad:
            raise MixtureError(f"ratios must be finite and >= 0, got {bad}")
        self.names = [name for name, r in ratios.items() if r > 0]
        if not self.names:
            raise MixtureError("mixture has no source with a positive ratio")
        weights = np.array([ratios[name] for name in self.names], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self._cumulative = np.cumsum(self.probabilities)
        self._sources = dict(sources)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._passes = {name: 0 for name in self.names}
        self._taken = {name: 0 for name in self.names}
        self._iterators: dict[str, Iterator[T]] = {}
        self._restore: dict[str, Any] = {}  # saved states of stateful sources, applied on open

    def __iter__(self) -> MixtureSampler[T]:
        return self

    def __next__(self) -> tuple[str, T]:
        draw = self._rng.random()
        index = min(int(np.searchsorted(self._cumulative, draw, side="right")), len(self.names) - 1)
        name = self.names[index]
        return name, self._next_from(name)

    def _next_from(self, name: str) -> T:
        iterator = self._iterators.get(name) or self._open(name)
        sample = next(iterator, _END)
        if sample is _END and self._taken[name]:  # pass finished: start the next one
            self._passes[name] += 1
            self._taken[name] = 0
            sample = next(self._open(name), _END)
        if sample is _END:
            raise MixtureError(f"source {name!r} yielded no samples (pass {self._passes[name]})")
        self._taken[name] += 1
        return sample

    def _open(self, name: str) -> Iterator[T]:
        """(Re)create a source's iterator for its current pass, skipping what was already taken."""
        iterator = iter(self._sources[name](self._passes[name]))
        skip = self._taken[name]
        if name in self._restore:
            iterator.load_state_dict(self._restore.pop(name))
        elif skip:
            iterator = itertools.islice(iterator, skip, None)
        self._iterators[name] = iterator
        return iterator

    # --- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "names": list(self.names),
            "rng": self._rng.bit_generator.state,
            "passes": dict(self._passes),
            "taken": dict(self._taken),
            "sources": {**self._restore,  # restored, not reopened yet
                        **{name: it.state_dict() for name, it in self._iterators.items()
                           if hasattr(it, "state_dict")}},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise MixtureError(f"state is for sources {list(state['names'])}, "
                               f"this mixture has {self.names}")
        self.seed = state["seed"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._passes = dict(state["passes"])
        self._taken = dict(state["taken"])
        self._iterators = {}
        self._restore = dict(state.get("sources", {}))

    def sources(self) -> dict[str, Iterator[T]]:
        """The source iterators opened so far (e.g. to read their counters)."""
        return dict(self._iterators)
