"""Budgets -> per-layer schedules (METHODS.md sec. E5).

Users state how many tokens to keep (or what fraction to remove); each method
turns that into its own per-layer schedule, and the schedule meets the budget
exactly. Schedules are lists of *net* tokens removed at each layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .errors import ConfigError


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


def pyramid_ratio(target: float, stages: Sequence[int], num_layers: int, tolerance: float = 1e-9) -> float:
    """PyramidDrop's lambda for a layer-averaged budget (METHODS.md sec. E4-E5), by bisection.

    With cuts at layers ``stages`` (increasing), stage s keeps lambda**s of the visual
    tokens, so the layer-averaged fraction is
    (stages[0] + sum_s (stages[s+1] - stages[s]) * lambda**(s+1)) / num_layers,
    with stages[S] = num_layers: increasing in lambda, from stages[0] / L at 0 to 1 at 1.
    ``target`` is that fraction (T_eq / N). Returns lambda in [0, 1].
    """
    bounds = [*stages, num_layers]

    def average(lam: float) -> float:
        return (bounds[0] + sum((bounds[s + 1] - bounds[s]) * lam ** (s + 1) for s in range(len(stages)))) / num_layers

    if not average(0.0) <= target <= 1.0:
        raise ConfigError(
            f"PDropConfig: a layer-averaged budget of {target:.3f} of the visual tokens is out of reach with cuts at {list(stages)} "
            f"of {num_layers} layers (at least {average(0.0):.3f}: the layers before the first cut see every token)"
        )
    low, high = 0.0, 1.0
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if average(mid) < target else (low, mid)
    return (low + high) / 2
