"""DivPrune (arXiv 2503.02175; METHODS.md B5): the max-min diverse subset of the projected visual tokens.

Acts on the LLM-input embeddings (H3, the paper's best layer 0) and needs no
attention scores. The paper's default keeps 9.8 % of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BudgetConfig
from ...merge_slot import Site
from ...ops.matching import max_min_diverse
from ...ops.merge import TokenPlan
from ...registry import register_method
from ..base import SingleStep

DEFAULT_SUBSET_RATIO = 0.098


@dataclass(frozen=True, kw_only=True)
class DivPruneConfig(BudgetConfig):
    """Keep ``keep`` tokens per image, or remove ``ratio``; default keeps 9.8 % (the paper's SUBSET_RATIO)."""

    method = "divprune"


@register_method(DivPruneConfig)
class DivPrune(SingleStep):
    description = "DivPrune: greedy max-min diverse subset of the projected visual tokens"
    sites = frozenset({"projector_output", "merger_output"})
    default_ratio = 1.0 - DEFAULT_SUBSET_RATIO

    def plan(self, site: Site) -> TokenPlan:
        p = site.protected
        chosen = max_min_diverse(site.x[:, p:], site.x.shape[1] - p - site.remove) + p
        head = torch.arange(p, device=site.x.device).expand(site.x.shape[0], p)
        return TokenPlan(keep=torch.cat([head, chosen], dim=1))
