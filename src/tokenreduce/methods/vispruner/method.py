"""VisPruner (arXiv 2412.01818, sec. 3; METHODS.md B3), at the feature layer's output.

* Important tokens: the top floor(T * important_ratio) patches by [CLS] attention.
* Diverse tokens, from the rest: repeated ToMe-style de-duplication on the
  pre-projector features. The remainder alternates into halves A and B; each A
  token's highest cosine similarity to B measures how duplicated it is; up to
  ``per_round`` (8 in the reference) most duplicated A tokens are removed per
  round, until the remainder fits the diverse budget.

Kept tokens stay in spatial order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BudgetConfig, check_range, require_one
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import deduplicate, keep_top
from ...ops.merge import TokenPlan, complement, gather_tokens
from ...registry import register_method
from ..base import SingleStep


@dataclass(frozen=True, kw_only=True)
class VisPrunerConfig(BudgetConfig):
    """``keep`` visual tokens per image: ``important_ratio`` of them by [CLS] attention, the rest diverse."""

    method = "vispruner"
    important_ratio: float = 0.5
    per_round: int = 8

    def validate(self) -> None:
        super().validate()
        require_one(self, ("keep", "ratio"))
        check_range(self, "important_ratio", 0.0, 1.0)
        if isinstance(self.per_round, bool) or not isinstance(self.per_round, int) or self.per_round < 1:
            raise ConfigError(f"VisPrunerConfig: per_round={self.per_round!r} is invalid; an int >= 1")


@register_method(VisPrunerConfig)
class VisPruner(SingleStep):
    description = "VisPruner: important tokens by [CLS] attention + diverse tokens by iterative de-duplication"
    sites = frozenset({"vit_output", "merger_output"})

    def plan(self, site: Site) -> TokenPlan:
        n, p = site.x.shape[1], site.protected
        kept = n - p - site.remove
        important = int(kept * self.config.important_ratio)
        chosen = keep_top(site.importance(), important, p)
        rest = complement(chosen, n)  # ascending; the protected tokens are in ``chosen``
        diverse = torch.gather(rest, 1, deduplicate(gather_tokens(site.x, rest), kept - important, self.config.per_round))
        return TokenPlan(keep=torch.cat([chosen, diverse], dim=1).sort(dim=1).values)
