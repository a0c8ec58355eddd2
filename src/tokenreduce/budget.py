"""Budgets -> per-layer schedules (METHODS.md sec. E5).

Users state how many tokens to keep (or what fraction to remove); each method
turns that into its own per-layer schedule, and the schedule meets the budget
exactly. Schedules are lists of *net* tokens removed at each layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConfigError

Schedule = TypeVar("Schedule")
BISECTION_STEPS = 64  # halvings of a continuous knob's range: far below any change of an integer schedule


def tokens_to_remove(reducible: int, keep: int | None, ratio: float | None, who: str) -> int:
    """Total tokens to remove from ``reducible`` tokens for a keep-count or ratio budget."""
    if keep is not None:
        if keep > reducible:
            raise ConfigError(f"{who}: keep={keep} is larger than the {reducible} reducible tokens of this input; use keep <= {reducible}")
        return reducible - keep
    return int(round(float(ratio or 0.0) * reducible))


def proportional(total: int, weights: Sequence[float]) -> list[int]:
    """Split an integer total in proportion to weights, largest remainder first, ties to earlier layers."""
    if total == 0 or not weights:
        return [0] * len(weights)
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def linear_weights(num: int, inflection: float) -> list[float]:
    """ToMe's linear r schedule shape: from 1 - inflection to 1 + inflection (-1 = front-loaded, decreasing to 0)."""
    if num == 1:
        return [1.0]
    return [(1.0 - inflection) + 2.0 * inflection * i / (num - 1) for i in range(num)]


def fit_caps(wanted: list[int], start: int, cap: Callable[[int], int], who: str) -> list[int]:
    """Make a schedule feasible when each layer can remove at most ``cap(current tokens)``.

    Excess is carried to later layers; if some is left, the whole budget is
    re-placed greedily from the front. Raises if the budget cannot be met at all.
    """
    total = sum(wanted)
    schedule, current, carry = [], start, 0
    for want in wanted:
        take = min(want + carry, cap(current))
        carry = want + carry - take
        schedule.append(take)
        current -= take
    if carry == 0:
        return schedule
    schedule, current, left = [], start, total
    for _ in wanted:
        take = min(left, cap(current))
        schedule.append(take)
        current -= take
        left -= take
    if left:
        raise ConfigError(f"{who}: cannot remove {total} of {start} tokens over {len(wanted)} layers (at most {total - left}); keep more tokens or reduce at more layers")
    return schedule


def geometric_counts(start: int, end: int, steps: int) -> list[int]:
    """Token counts after each of ``steps`` reductions, decaying geometrically from start to exactly end."""
    if steps == 0:
        return []
    if end == 0:
        return [0] * steps
    q = (end / start) ** (1.0 / steps)
    counts = [max(end, round(start * q ** (i + 1))) for i in range(steps - 1)]
    return counts + [end]


@dataclass(frozen=True)
class Knob(Generic[Schedule]):
    """A method's one-parameter family of schedules, the thing a budget is solved into (METHODS.md sec. E5).

    ``schedule(x)`` for ``x`` in ``[low, high]`` must be monotone: a larger ``x``
    never keeps fewer tokens at any layer, so every measure that grows with the
    tokens (T_eq, FLOPs) is non-decreasing in ``x``. ``integer`` knobs (a kept count)
    are searched over the integers, continuous ones (PDrop's lambda, a scale) by
    bisection.
    """

    name: str
    low: float
    high: float
    integer: bool
    schedule: Callable[[float], Schedule]


def solve_knob(knob: Knob[Schedule], measure: Callable[[Schedule], float], target: float) -> tuple[float, Schedule] | None:
    """The schedule whose measure is the largest not exceeding ``target``, and its knob value; None if none is that low.

    Largest-not-exceeding (rather than closest) makes a budget a guarantee: the
    achieved T_eq or FLOPs never exceeds what was asked, and one step more of the
    knob would. Among knob values that reach that best measure (a schedule of
    integer counts is constant over an interval of a continuous knob) the smallest
    is returned, so the answer is canonical: PDrop's lambda for T_eq = 270 of 576
    at 32 layers is exactly 0.5, the closed form of sec. E5.
    """
    if measure(knob.schedule(knob.low)) > target:
        return None
    best, _ = _split(knob, knob.low, knob.high, lambda x: measure(knob.schedule(x)) <= target)
    achieved = measure(knob.schedule(best))
    _, value = _split(knob, knob.low, best, lambda x: measure(knob.schedule(x)) < achieved)
    return value, knob.schedule(value)


def _split(knob: Knob, low: float, high: float, holds: Callable[[float], bool]) -> tuple[float, float]:
    """(last x that holds, first x that fails) in [low, high] for a predicate that holds, then fails, as x grows.

    At the ends: (high, high) if it never fails, (low, low) if it fails at once.
    Integer knobs are searched over the integers, continuous ones bisected
    :data:`BISECTION_STEPS` times.
    """
    if holds(high):
        return high, high
    if not holds(low):
        return low, low
    if knob.integer:
        low, high = int(low), int(high)
    for _ in range(BISECTION_STEPS):
        if knob.integer and high - low <= 1:
            break
        mid = (low + high) // 2 if knob.integer else (low + high) / 2
        low, high = (mid, high) if holds(mid) else (low, mid)
    return low, high
