"""Arrival schedules: open-loop load, fixed from the run start.

A schedule is an iterator of arrival offsets in seconds from the start of the load window. Arrivals do
not wait for earlier invocations to finish (open loop, as real traffic does not), so when the emulator
or the database falls behind, the lag shows as the gap between scheduled and actual start.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator


def poisson(rps: float, duration_s: float, rng: random.Random) -> Iterator[float]:
    """A Poisson process: exponential gaps with mean 1/rps, until `duration_s`."""
    t = rng.expovariate(rps)
    while t < duration_s:
        yield t
        t += rng.expovariate(rps)


def constant(rps: float, duration_s: float) -> Iterator[float]:
    """Evenly spaced arrivals, the first at 0."""
    i = 0
    while (t := i / rps) < duration_s:
        yield t
        i += 1


def fixed(times: Iterable[float]) -> Iterator[float]:
    """Arrivals at given offsets (sorted), e.g. a test's exact scenario or a replayed trace."""
    return iter(sorted(times))


def schedule(kind: str, rps: float, duration_s: float, seed: int) -> Iterator[float]:
    """The schedule named by `--arrivals`."""
    if kind == "constant":
        return constant(rps, duration_s)
    return poisson(rps, duration_s, random.Random(seed))
