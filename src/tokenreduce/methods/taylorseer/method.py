"""TaylorSeer: forecast skipped steps from finite differences of the last full steps (METHODS.md D5).

After the ``warmup`` leading steps, every unit is computed every ``interval``
steps; each full step refreshes the unit's Taylor factors [f, f', ..., f^(m)]
by finite differences over the gap between full steps (arXiv 2503.06923,
eq. 6); the steps in between emit sum_k f^(k) d^k / k! at distance d from the
last full step (eq. 7), and the block applies the current gate to it (D0).
Factors are kept in the model dtype. Every unit (attention, cross-attention,
MLP) is forecast, as in the official DiT / FLUX code; the diffusers port
hooks attention modules only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ReductionConfig
from ...diffusion.method import DiffusionMethod, UnitCall, check_int, every
from ...diffusion.state import DiffusionRun
from ...ops.cache import taylor_forecast, taylor_update
from ...registry import register_method


@dataclass(frozen=True, kw_only=True)
class TaylorSeerConfig(ReductionConfig):
    """interval: a full step every N steps after the warm-up (1 = no caching); order: Taylor order m;
    warmup: leading steps always computed. Defaults are the diffusers port's (5 / 1 / 3);
    the DiT paper setting is interval 4, order 4, warmup 2."""

    method = "taylorseer"
    interval: int = 5
    order: int = 1
    warmup: int = 3

    def validate(self) -> None:
        super().validate()
        check_int(self, "interval", 1)
        check_int(self, "order", 0)
        check_int(self, "warmup", 1)


def _map(function: Any, value: Any, *others: Any) -> Any:
    """Apply ``function`` to a tensor or elementwise to a tuple of tensors (joint attention returns two)."""
    if isinstance(value, tuple):
        return tuple(function(*parts) for parts in zip(value, *others))
    return function(value, *others)


@register_method(TaylorSeerConfig)
class TaylorSeer(DiffusionMethod):
    description = "TaylorSeer: forecast each unit's output by a Taylor expansion from the last full steps"

    def min_steps(self) -> int:
        return self.config.warmup + 1 if self.config.interval > 1 else 1

    def begin(self, run: DiffusionRun) -> None:
        store, step = run.store, run.call.step
        full = every(step, self.config.interval, self.config.warmup)
        store["full"] = full
        if full:
            store["gap"] = step - store.get("last_full", step)
            store["last_full"] = step
        run.count("full_steps" if full else "partial_steps")

    def unit(self, run: DiffusionRun, call: UnitCall) -> Any:
        store = run.store
        if store["full"] or call.key not in store:
            out = call.compute(None)
            old = store.get(call.key) if store.get("gap", 0) > 0 else None
            store[call.key] = [out] if old is None else self._update(old, out, store["gap"])
            return out
        distance = run.call.step - store["last_full"]
        factors = store[call.key]
        return _map(lambda *terms: taylor_forecast(list(terms), distance), *factors)

    def _update(self, old: list[Any], out: Any, gap: int) -> list[Any]:
        """New factor list; tuples (joint attention) are updated elementwise."""
        if isinstance(out, tuple):
            per_part = [taylor_update([f[i] for f in old], part, gap, self.config.order) for i, part in enumerate(out)]
            return [tuple(parts[k] for parts in per_part) for k in range(len(per_part[0]))]
        return taylor_update(old, out, gap, self.config.order)
