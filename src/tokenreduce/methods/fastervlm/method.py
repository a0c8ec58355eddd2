"""FasterVLM (arXiv 2412.01818 v1, sec. 3; METHODS.md B2).

Keep the patches the vision encoder's [CLS] attends to most at the feature layer
(softmax, mean over heads), in spatial order, and drop the rest before the
projector. [CLS]-free towers score by attention received instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import BudgetConfig, require_one
from ...merge_slot import Site
from ...ops.matching import keep_top
from ...ops.merge import TokenPlan
from ...registry import register_method
from ..base import SingleStep


@dataclass(frozen=True, kw_only=True)
class FasterVLMConfig(BudgetConfig):
    """Keep ``keep`` visual tokens per image (or remove a ``ratio`` of them)."""

    method = "fastervlm"

    def validate(self) -> None:
        super().validate()
        require_one(self, ("keep", "ratio"))


@register_method(FasterVLMConfig)
class FasterVLM(SingleStep):
    description = "FasterVLM: keep the top [CLS]-attention patches of the feature layer"
    sites = frozenset({"vit_output", "merger_output"})

    def plan(self, site: Site) -> TokenPlan:
        scores = site.importance()
        return TokenPlan(keep=keep_top(scores, site.x.shape[1] - site.protected - site.remove, site.protected))
