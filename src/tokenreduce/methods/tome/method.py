"""ToMe: merge the r most similar token pairs in every block (arXiv 2210.09461, sec. 3).

Filter + correlate: bipartite soft matching on the block's keys (mean over heads).
Compress: size-weighted average, sizes carried forward, and proportional
attention (log size added to the logits) in later blocks. The merge sits between
attention and MLP, as in the paper; our adapter-owned block forward keeps
LayerScale, qk-norm and fused SDPA, which the reference's copied timm forward drops.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...budget import fit_caps, linear_weights, proportional, tokens_to_remove
from ...config import BudgetConfig, check_layers, check_range, require_one
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import bipartite_soft_matching, max_bipartite_merges
from ...ops.merge import TokenPlan
from ...ops.scoring import key_metric
from ...registry import register_method
from ..base import VitMethod


@dataclass(frozen=True, kw_only=True)
class ToMeConfig(BudgetConfig):
    """ToMe settings.

    Give one of ``r`` (tokens merged per layer, the paper's knob), ``keep`` or
    ``ratio``. ``inflection`` shapes the schedule as in the reference: 0 constant,
    -1 decreasing (front-loaded, 2r down to 0), +1 increasing. ``layers`` limits
    merging to some blocks (default: all). ``prop_attn`` is on by default, as for
    off-the-shelf timm models in the paper.
    """

    method = "tome"
    r: int | None = None
    inflection: float = 0.0
    layers: tuple[int, ...] | None = None
    prop_attn: bool = True

    def validate(self) -> None:
        super().validate()
        require_one(self, ("r", "keep", "ratio"))
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise ConfigError(f"ToMeConfig: r={self.r!r} is invalid; r is the number of tokens merged per layer, an int >= 0")
        check_range(self, "inflection", -1.0, 1.0)
        check_layers(self, "layers")


@register_method(ToMeConfig)
class ToMe(VitMethod):
    description = "Token Merging: bipartite soft matching on keys, size-weighted merge, proportional attention"
    track_sizes = True

    def __init__(self, config: ToMeConfig, facts: dict) -> None:
        self.prop_attn = config.prop_attn
        super().__init__(config, facts)

    def solve(self, reducible: int) -> list[int]:
        config: ToMeConfig = self.config
        layers = self.check_layers(config.layers or range(self.num_layers), "layers")
        protected = self.facts["protected_tokens"]

        def cap(current: int) -> int:
            return max(0, max_bipartite_merges(current + protected, protected))

        weights = linear_weights(len(layers), config.inflection)
        if config.r is not None:
            wanted = [int(config.r * w) for w in weights]
            removals, current = [], reducible
            for want in wanted:
                removals.append(min(want, cap(current)))
                current -= removals[-1]
        else:
            total = tokens_to_remove(reducible, config.keep, config.ratio, "ToMeConfig")
            removals = fit_caps(proportional(total, weights), reducible, cap, "ToMeConfig")
        return self.at_layers(layers, removals)

    def plan(self, site: Site) -> TokenPlan:
        return bipartite_soft_matching(key_metric(site.k), site.remove, site.protected)
