"""Wall-clock timing that survives noisy, shared machines.

Timing a baseline first and a reduced model afterwards compares them under
different conditions (thermal state, other tenants, frequency scaling, a
background job that started in between), which can easily swamp the
speed-up being measured. :func:`time_interleaved` therefore times all candidates
in one process, A/B interleaved: each repeat runs every candidate once, and the
order is rotated every round so that no candidate always runs first (on a cold
cache) or always right after a particular other one. Any drift in the machine
then hits all candidates alike.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Timing", "speedup", "time_interleaved"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed call of one candidate, in call order."""

    times: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("Timing needs at least one measured time")

    @property
    def min(self) -> float:
        """Fastest call: a lower bound, optimistic on a noisy machine."""
        return min(self.times)

    @property
    def median(self) -> float:
        """Typical call; robust to the occasional slow outlier (see :func:`speedup`)."""
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        """Average call; pulled up by outliers, reported for completeness."""
        return statistics.fmean(self.times)


def speedup(base: Timing, other: Timing) -> float:
    """How many times faster ``other`` is than ``base`` (> 1 means faster), by medians.

    Medians, because on a shared machine the noise is one-sided and bursty: a
    garbage collection, a page fault storm or another tenant makes a few calls
    much slower, never faster. The mean is dragged by those few calls; the minimum
    rewards one lucky call and is itself noisy. The median reflects the typical
    call and moves little when a few samples are disturbed.
    """
    return base.median / other.median


def _synchronize_fn() -> Callable[[], None]:
    """Return the barrier to call before reading the clock.

    CUDA kernels run asynchronously, so without a synchronisation the clock would
    only measure the time to *enqueue* the work. On CPU-only machines no barrier
    is needed.
    """
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(
    candidates: Mapping[str, Callable[[], Any]],
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin, after ``warmup`` calls each.

    Warm-up calls (also round-robin) absorb one-off costs such as lazy
    initialisation, allocator growth, kernel selection and cold caches; they are
    not recorded. Then, in round ``r`` the candidates run in their mapping order
    rotated left by ``r`` (``A B C``, ``B C A``, ``C A B``, ...), each call timed
    with :func:`time.perf_counter` between two CUDA synchronisations (if CUDA is
    available). Returns one :class:`Timing` per candidate name, with ``repeats``
    times each.
    """
    if not candidates:
        raise ValueError("time_interleaved needs at least one candidate")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    synchronize = _synchronize_fn()
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()

    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            candidates[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(samples)) for name, samples in times.items()}
