"""DuCa: dual feature caching (arXiv 2412.18911; METHODS.md D4), a ToCa variant on ToCa's machinery.

DuCa observes that refreshing the "important" tokens at every partial step is
unnecessary and that importance-based selection is sometimes worse than random.
Between two full steps it therefore alternates two kinds of partial steps:

* aggressive: every unit returns its cached output (FORA-like, D2), nothing is
  recomputed; the staleness counters s3 still grow;
* conservative: ToCa's partial refresh (D1.3): self / joint attention reused
  whole, cross-attention and MLP recompute their top ``rho * N`` tokens by score.

The first partial step after a full step is aggressive, the next conservative,
and so on (full, A, C, A, C, ...), so the conservative steps repair the error
the aggressive ones let in. Token selection needs no attention map (DuCa's
point over ToCa: SDPA / FlashAttention compatible): the base score is random,
drawn once per (step, block, unit) and shared by every sample and both CFG
halves, then ToCa's s3 staleness bonus and s4 grid bonus are added. Schedules
(N, rho and its layer / step / module ramps) are ToCa's presets (D1.5, D1.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...diffusion.method import UnitCall, UnitSpec, check_int, unit_generator
from ...diffusion.state import DiffusionRun
from ...errors import ConfigError
from ...ops.scoring import l2_normalize
from ...registry import register_method
from ..toca.method import ToCa, ToCaConfig


@dataclass(frozen=True, kw_only=True)
class DuCaConfig(ToCaConfig):
    """DuCa settings: ToCa's (preset, interval, fresh_ratio, ...; ``None`` fields from the preset), with a
    random base score (``score="random"``, ``seed``) and partial steps alternating aggressive / conservative.
    ``reference_compat`` (ToCa's per-layer full-step quirk) has no DuCa meaning and is refused."""

    method = "duca"
    scores: ClassVar[tuple[str, ...]] = ("random",)
    score: str = "random"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int(self, "seed", 0)
        if self.reference_compat:
            raise ConfigError("DuCaConfig: reference_compat reproduces a ToCa code quirk and does not apply to DuCa; leave it False")


@register_method(DuCaConfig)
class DuCa(ToCa):
    description = "DuCa: alternate aggressive (reuse all) and conservative (ToCa refresh of random tokens) steps between full steps"

    def wants_probe(self, unit: UnitSpec) -> bool:
        return False  # random selection: no attention statistics

    def begin(self, run: DiffusionRun) -> None:
        super().begin(run)
        store = run.store
        store["since_full"] = 0 if store["full"] else store.get("since_full", 0) + 1
        store["aggressive"] = store["since_full"] % 2 == 1
        if store["aggressive"]:
            run.count("aggressive_steps")

    def ratio(self, run: DiffusionRun, call: UnitCall) -> float:
        """0 on aggressive steps (reuse everything), ToCa's rho on conservative ones."""
        return 0.0 if run.store["aggressive"] else super().ratio(run, call)

    def _base_score(self, run: DiffusionRun, call: UnitCall) -> torch.Tensor:
        batch, n = call.x.shape[:2]
        row = torch.rand(n, generator=unit_generator(self.config.seed, run, call)).to(call.x.device)
        return l2_normalize(row.expand(batch, n))
