"""TeaCache: skip the whole block stack while the timestep-modulated input barely changes (METHODS.md D6).

Indicator (arXiv 2411.19108, sec. 3.3; the FLUX code): the relative L1 change,
between consecutive steps, of block 0's modulated input (``norm1(x, temb)``),
mapped through a per-model polynomial and accumulated. While the accumulator
stays below ``threshold`` the stack is skipped and the residual of its last
computation (stack output - stack input) is added; otherwise the stack runs, the
residual is stored and the accumulator resets. The first and last steps always
run. Per sample, with the state in the run, not in class attributes (the
reference's class-level state is shared by every instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...config import ReductionConfig, check_range
from ...diffusion.method import BlockCall, DiffusionMethod, cached_tail, check_int
from ...diffusion.state import DiffusionRun
from ...errors import ConfigError
from ...ops.cache import polynomial, relative_l1
from ...registry import register_method

COEFFICIENTS = {"flux": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)}
"""Published rescaling polynomials (TeaCache4FLUX); other families use the raw change (1, 0) unless given."""


@dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(ReductionConfig):
    """threshold: ``rel_l1_thresh`` (FLUX 0.25 / 0.4 / 0.6 / 0.8 trade speed for quality; 0 = never skip).
    coefficients: polynomial (highest power first) mapping the raw change to the
    calibrated one; None = the published fit for the model family, else identity.
    num_steps: for a bare transformer, so the last step is always computed."""

    method = "teacache"
    threshold: float = 0.25
    coefficients: tuple[float, ...] | None = None
    num_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        check_range(self, "threshold", 0.0, float("inf"))
        check_int(self, "num_steps", 1)
        if self.coefficients is not None and (
            not isinstance(self.coefficients, tuple) or not self.coefficients
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in self.coefficients)
        ):
            raise ConfigError(f"TeaCacheConfig: coefficients={self.coefficients!r} is invalid; expected a non-empty tuple of numbers")


@register_method(TeaCacheConfig)
class TeaCache(DiffusionMethod):
    description = "TeaCache: skip the block stack while the accumulated change of the modulated input stays small"
    level = "block"

    def __init__(self, config: TeaCacheConfig, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        self.coefficients = config.coefficients or COEFFICIENTS.get(facts["family"], (1.0, 0.0))

    def block(self, run: DiffusionRun, call: BlockCall) -> Any:
        return cached_tail(run, call, start=0, skip=self._decide(run, call) if call.block.layer == 0 else None)

    def _decide(self, run: DiffusionRun, call: BlockCall) -> torch.Tensor:
        store, step = run.store, run.call
        modulated = call.modulated()
        previous = store.get("modulated")
        store["modulated"] = modulated
        batch = modulated.shape[0]
        accumulated = store.get("accumulated", torch.zeros(batch, device=modulated.device))
        edge = previous is None or step.step == 0 or (step.num_steps is not None and step.step == step.num_steps - 1)
        if edge:
            accumulated = torch.zeros_like(accumulated)
            skip = torch.zeros(batch, dtype=torch.bool, device=modulated.device)
        else:
            accumulated = accumulated + polynomial(self.coefficients, relative_l1(modulated, previous))
            skip = accumulated < self.config.threshold
            accumulated = torch.where(skip, accumulated, torch.zeros_like(accumulated))
        store["accumulated"] = accumulated
        return skip
