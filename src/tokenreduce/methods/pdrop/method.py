"""PyramidDrop (arXiv 2410.17247, sec. 3.2; METHODS.md C2).

Visual redundancy grows with depth, so the decoder is split into stages at
``layers`` and stage s keeps lambda**s of the visual tokens (a pyramid). At each
boundary layer K the score is the attention of the last instruction token to
the visual tokens computed with *layer K's own* input norm, q/k projections and
RoPE on the hidden states entering K (probe P2; softmax over the whole causal
row, mean over heads), top-k, order kept. Defaults are the official code's:
``layer_list = [8, 16, 24]`` of LLaVA-1.5-7B's 32 layers, lambda = 0.5 (576 ->
288 / 144 / 72, about 270 layer-averaged tokens). Without ``layers`` the stages
are the quarter points of the decoder, round(L * s / 4) for s = 1, 2, 3, which
is exactly [8, 16, 24] at L = 32 and keeps the 4-stage pyramid on other depths. Survivors keep their original positions by
default (convention 0.5.5); the reference re-indexes them contiguously and shifts the
decode positions per stage (C2 step 4), available as ``positions="compact"``.

Budgets: ``ratios`` gives the retention of each stage explicitly (non-increasing);
otherwise ``lam``, unless a budget is given. ``keep`` (layer-averaged visual tokens,
sec. E4) and ``ratio`` (layer-averaged fraction removed, i.e. T_eq = (1 - ratio) * N)
are T_eq budgets, so they go through the same solver as ``equivalent_tokens``
(sec. E5): lambda is solved for the achieved (floored) schedule, T_eq never exceeds
the target, and ``keep=T`` and ``equivalent_tokens=T`` give one schedule. 270 of 576
at 32 layers gives lambda = 0.5 as (1 + l + l^2 + l^3) / 4 = 270 / 576 does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from ...budget import Knob
from ...config import BudgetConfig, check_layers, check_range
from ...errors import ConfigError
from ...ops.scoring import query_rows_attention
from ...registry import register_method
from ..inllm import CutSite, Cuts, DecoderBudgetConfig, DecoderMethod, top_visual

STAGES = 4
DEFAULT_LAMBDA = 0.5


@dataclass(frozen=True, kw_only=True)
class PDropConfig(DecoderBudgetConfig, BudgetConfig):
    """Cut at ``layers`` (default: the decoder's quarter points) keeping lam**s of the visual tokens in stage s.

    Or give explicit per-stage ``ratios`` (retention, non-increasing), or a budget:
    ``keep`` = layer-averaged visual tokens, ``ratio`` = layer-averaged fraction removed.
    """

    method = "pdrop"
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "ratio", "ratios")
    layers: tuple[int, ...] | None = None
    lam: float = DEFAULT_LAMBDA
    ratios: tuple[float, ...] | None = None

    def validate(self) -> None:
        super().validate()
        check_layers(self, "layers")
        check_range(self, "lam", 0.0, 1.0)
        if self.ratios is None:
            return
        stages = STAGES - 1 if self.layers is None else len(self.layers)
        if not isinstance(self.ratios, tuple) or len(self.ratios) != stages:
            raise ConfigError(f"PDropConfig: ratios={self.ratios!r} must be a tuple with one retention per cut ({stages} cuts)")
        for index, value in enumerate(self.ratios):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"PDropConfig: ratios[{index}]={value!r} is invalid; a retention is a number in [0, 1]")
        if any(later > earlier for earlier, later in zip(self.ratios, self.ratios[1:])):
            raise ConfigError(f"PDropConfig: ratios={self.ratios} must not increase from stage to stage (a pyramid keeps fewer tokens deeper)")


@register_method(PDropConfig)
class PDrop(DecoderMethod):
    description = "PyramidDrop: keep lambda^s of the visual tokens in stage s, ranked by the last token's attention (in-LLM)"

    @cached_property
    def layers(self) -> tuple[int, ...]:
        """The cut layers: the config's, or the quarter points of this decoder."""
        if self.config.layers is not None:
            return self.config.layers
        return tuple(round(self.num_layers * s / STAGES) for s in range(1, STAGES))

    def cut_layers(self) -> tuple[int, ...]:
        for index, layer in enumerate(self.layers):
            self.check_cut_layer(layer, f"layers[{index}]")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"PDropConfig: this {self.num_layers}-layer decoder is too shallow for {STAGES} stages; give layers=(...)")
        return self.layers

    def configured_cuts(self, visual: int) -> Cuts:
        """The config's ratios, lam**s, or the schedule solved from ``keep`` / ``ratio`` as a T_eq budget."""
        config = self.config
        if config.ratios is not None:
            return self._stages(visual, list(config.ratios))
        if config.keep is None and config.ratio is None:
            return self._stages(visual, self._pyramid(config.lam))
        prompt = f"{visual} visual tokens"
        if config.keep is not None:
            if config.keep > visual:
                raise ConfigError(f"PDropConfig: keep={config.keep} is larger than the {visual} reducible tokens of this input")
            return self._solve(visual, "keep", config.keep, 1.0, lambda cuts: self.equivalent_tokens(visual, cuts), prompt)
        # measured as minus the layer-averaged tokens removed, in units of -N: non-decreasing in lambda as the solver
        # needs, the target is T_eq = (1 - ratio) * N, and the reach its error states reads as a ratio
        return self._solve(visual, "ratio", config.ratio, -visual, lambda cuts: -(visual - self.equivalent_tokens(visual, cuts)), prompt)

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        return Knob("lam", 0.0, 1.0, integer=False, schedule=lambda lam: self._stages(visual, self._pyramid(lam)))

    def _pyramid(self, lam: float) -> list[float]:
        """Retention lam**s of stage s = 1 .. S - 1."""
        return [lam ** (s + 1) for s in range(len(self.layers))]

    def _stages(self, visual: int, retention: list[float]) -> Cuts:
        # the code floors, int(N * ratio); the slack keeps a bisection-solved lambda from flooring one token short
        return [(layer, int(visual * r + 1e-6)) for layer, r in zip(self.layers, retention)]

    def select(self, site: CutSite) -> torch.Tensor:
        query_rows, key, valid, scale = site.row_probe()
        return top_visual(query_rows_attention(query_rows, key, scale, valid)[:, 0], site.visual, site.keep)
