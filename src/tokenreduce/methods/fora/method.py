"""FORA: reuse every attention and MLP output between full steps (arXiv 2407.01425, sec. 3; METHODS.md D2).

Every N steps all blocks run in full and each unit's output (before the block's
gate) is stored; the N - 1 steps in between return the stored outputs, and the
blocks re-apply the current step's adaLN gates to them (D0). Caches are per CFG
branch and per sample, so a doubled batch and two calls per step both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ReductionConfig
from ...diffusion.method import DiffusionMethod, UnitCall, check_int, every
from ...diffusion.state import DiffusionRun
from ...registry import register_method


@dataclass(frozen=True, kw_only=True)
class FORAConfig(ReductionConfig):
    """``interval``: N, a full step every N steps (1 = the uncached model)."""

    method = "fora"
    interval: int = 3

    def validate(self) -> None:
        super().validate()
        check_int(self, "interval", 1)


@register_method(FORAConfig)
class FORA(DiffusionMethod):
    description = "FORA: reuse each block's attention and MLP outputs, full compute every N steps"

    def begin(self, run: DiffusionRun) -> None:
        run.store["full"] = every(run.call.step, self.config.interval)
        run.count("full_steps" if run.store["full"] else "partial_steps")

    def unit(self, run: DiffusionRun, call: UnitCall) -> Any:
        store = run.store
        if store["full"] or call.key not in store:
            store[call.key] = call.compute(None)
        return store[call.key]
