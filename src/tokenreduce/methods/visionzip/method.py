"""VisionZip (arXiv 2412.04467, sec. 3.2-3.3; METHODS.md B1), at the feature layer's output.

* Dominant tokens: the patches with the highest [CLS] attention of the feature
  layer (the reference sums over heads; the ranking equals the mean's).
* Contextual tokens, from the rest: targets at a uniform stride over the remaining
  sequence; every other remaining token joins its most key-similar target
  (keys averaged over heads, L2-normalised); a contextual token is its target
  **plus** the mean of its group (not a mean including the target), appended
  after the dominant tokens as in the reference.

The budget is split as the reference's presets (54+10, 108+20, 162+30): about
10/64 of the kept tokens are contextual unless ``contextual`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BudgetConfig, require_one
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import keep_top
from ...ops.merge import TokenPlan, complement, gather_tokens
from ...ops.scoring import importance, key_metric
from ...registry import register_method
from ..base import SingleStep

CONTEXTUAL_SHARE = 10 / 64


@dataclass(frozen=True, kw_only=True)
class VisionZipConfig(BudgetConfig):
    """``keep`` visual tokens per image = dominant + ``contextual`` (default: round(keep * 10/64))."""

    method = "visionzip"
    contextual: int | None = None

    def validate(self) -> None:
        super().validate()
        require_one(self, ("keep", "ratio"))
        if self.contextual is not None and (isinstance(self.contextual, bool) or not isinstance(self.contextual, int) or self.contextual < 0):
            raise ConfigError(f"VisionZipConfig: contextual={self.contextual!r} is invalid; an int >= 0")
        if self.contextual is not None and self.keep is not None and self.contextual > self.keep:
            raise ConfigError(f"VisionZipConfig: contextual={self.contextual} exceeds keep={self.keep}")


@register_method(VisionZipConfig)
class VisionZip(SingleStep):
    description = "VisionZip: dominant tokens by [CLS] attention + contextual tokens merged by key similarity"
    sites = frozenset({"vit_output"})

    def split(self, kept: int) -> tuple[int, int]:
        """(dominant, contextual) counts for ``kept`` tokens."""
        contextual = self.config.contextual if self.config.contextual is not None else round(kept * CONTEXTUAL_SHARE)
        return kept - min(contextual, kept), min(contextual, kept)

    def plan(self, site: Site) -> TokenPlan:
        n, p = site.x.shape[1], site.protected
        dominant, contextual = self.split(n - p - site.remove)
        keep = keep_top(importance(site.q, site.k, site.scale, site.has_cls), dominant, p)
        rest = complement(keep, n)  # [B, R] ascending
        if contextual == 0:
            return TokenPlan(keep=keep)
        metric = gather_tokens(key_metric(site.k).float(), rest)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        stride = rest.shape[1] // contextual
        target_slot = torch.arange(contextual, device=rest.device) * stride  # positions within ``rest``
        similarity = metric @ metric[:, target_slot].transpose(-1, -2)  # [B, R, C]
        group = similarity.argmax(dim=-1)  # [B, R]
        group[:, target_slot] = torch.arange(contextual, device=rest.device)
        is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=rest.device)
        is_target[target_slot] = True
        is_member = (~is_target).float().expand_as(group)
        group_size = similarity.new_zeros(group.shape[0], contextual).scatter_add_(1, group, is_member).clamp_min(1.0)
        weight = torch.where(is_target, 1.0, 1.0 / group_size.gather(1, group))
        return TokenPlan(
            keep=keep, merge_src=rest, merge_dst=(group + keep.shape[1]).unsqueeze(-1), merge_weight=weight.unsqueeze(-1),
            new_tokens=contextual, additive=True,
        )
