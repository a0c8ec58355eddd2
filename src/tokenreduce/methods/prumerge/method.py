"""LLaVA-PruMerge / PruMerge+ (arXiv 2403.15388, sec. 3; METHODS.md B4), at the feature layer's output.

* Filter: the [CLS] attention of the patches, computed as the reference does,
  "single-head style" over the concatenated heads (scale (H*d)**-0.5, softmax over
  all tokens, [CLS] column dropped). Without a budget the kept patches are the
  IQR outliers of that distribution (above Q3 + 1.5 IQR), so the count adapts to
  the image (sec. 3.2). PruMerge+ adds uniformly strided spatial samples: with k
  outliers among P patches, every floor(floor(P / k) / 3)-th patch before the
  last one, as in the reference code (about 25 % of the tokens in total).
* Correlate: every kept patch gathers its ``neighbours`` (32) most key-similar
  patches, kept or not (cosine of the concatenated keys; sec. 3.3).
* Compress: each kept patch adds its neighbours weighted by their [CLS]
  attention, x_i <- x_i + sum_j a_j x_j (not normalised, as the reference), and
  one appended token collects every pruned patch the same way, sum_j a_j x_j.

Library decisions: the scores and keys are those of the feature layer (the
reference reads q and k of CLIP's last layer, one block after its features);
kept tokens stay in spatial order with the collected token last; an image with
no outlier keeps its top patch. With ``keep`` or ``ratio`` the method meets the
budget exactly, the collected token included: PruMerge keeps the top (T - 1)
patches; PruMerge+ a quarter of them by attention (the reference's outlier share)
and the rest at a uniform stride over the remaining patches.

Adaptive counts differ per image: rows are padded (``TokenPlan.valid``) and the
adapter drops the padding per image before the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from ...budget import tokens_to_remove
from ...config import BudgetConfig
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import keep_top, nearest_neighbours
from ...ops.merge import TokenPlan, complement, kept_first
from ...ops.scoring import importance, iqr_outliers, merge_heads
from ...registry import register_method
from ..base import SingleStep

NEIGHBOURS = 32
IMPORTANT_SHARE = 0.25  # PruMerge+: outliers k, strided samples ~3k (stride P / k / 3)


@dataclass(frozen=True, kw_only=True)
class PruMergeConfig(BudgetConfig):
    """No budget: adaptive (IQR outliers, the paper's mode). ``keep`` / ``ratio``: that many tokens per image, exactly.

    ``neighbours``: key-nearest patches each kept patch absorbs (32 in the reference).
    """

    method = "prumerge"
    neighbours: int = NEIGHBOURS

    def validate(self) -> None:
        super().validate()
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise ConfigError(f"{type(self).__name__}: neighbours={self.neighbours!r} is invalid; an int >= 0")
        if self.keep is not None and self.keep < 2:
            raise ConfigError(f"{type(self).__name__}: keep={self.keep} is too small; one kept patch plus the collected token needs keep >= 2")


@dataclass(frozen=True, kw_only=True)
class PruMergePlusConfig(PruMergeConfig):
    """PruMerge+: PruMerge plus uniformly strided spatial samples (same fields)."""

    method = "prumerge_plus"


@register_method(PruMergeConfig)
class PruMerge(SingleStep):
    description = "LLaVA-PruMerge: adaptive [CLS]-attention outliers absorbing their key neighbours, plus one token for the rest"
    sites = frozenset({"vit_output"})

    @property
    def adaptive(self) -> bool:
        return self.config.keep is None and self.config.ratio is None

    def solve(self, reducible: int) -> list[int]:
        """Adaptive: a placeholder removal of 1 (the real count is decided per image); else the budget, checked."""
        self.check_layers((self.layer,), "layer")
        if self.adaptive:
            return self.at_layers([self.layer], [1])
        remove = tokens_to_remove(reducible, self.config.keep, self.config.ratio, type(self.config).__name__)
        if 0 < remove and reducible - remove < 2:
            raise ConfigError(f"{type(self.config).__name__}: {reducible - remove} tokens left; one kept patch plus the collected token needs 2")
        return self.at_layers([self.layer], [remove])

    def select(self, attention: torch.Tensor, kept: int | None) -> torch.Tensor:
        """[B, P] bool: the kept patches, adaptive (``kept`` None) or exactly ``kept`` per image."""
        if kept is not None:
            return torch.zeros_like(attention, dtype=torch.bool).scatter_(1, keep_top(attention, kept), True)
        outliers = iqr_outliers(attention)
        return outliers.scatter_(1, attention.argmax(dim=-1, keepdim=True), True)

    def plan(self, site: Site) -> TokenPlan:
        p, (batch, n) = site.protected, site.x.shape[:2]
        patches = n - p
        q, k = merge_heads(site.q), merge_heads(site.k)
        attention = importance(q, k, q.shape[-1] ** -0.5, site.has_cls)[:, p:]  # [B, P]
        selected = self.select(attention, None if self.adaptive else patches - site.remove - 1)
        keep, valid = kept_first(selected)  # [B, W] patch indices
        width = keep.shape[1]
        count = min(self.config.neighbours, patches - 1)
        neighbours = nearest_neighbours(k[:, 0, p:], keep, count)  # [B, W, count]
        pruned = ~selected
        sources = torch.cat([neighbours.flatten(1), torch.arange(patches, device=keep.device).expand(batch, patches)], dim=1)
        slot = torch.arange(width, device=keep.device).repeat_interleave(count).expand(batch, -1)
        targets = torch.cat([slot, torch.full((batch, patches), width, device=keep.device)], dim=1)  # ``width``: the collected token
        gate = torch.cat([valid.repeat_interleave(count, dim=1), pruned], dim=1)
        weight = torch.gather(attention, 1, sources) * gate
        head = torch.arange(p, device=keep.device).expand(batch, p)
        collected = pruned.any(dim=1, keepdim=True)
        out_valid = torch.cat([torch.ones_like(head, dtype=torch.bool), valid, collected], dim=1)
        return TokenPlan(
            keep=torch.cat([head, keep + p], dim=1), merge_src=sources + p, merge_dst=(targets + p).unsqueeze(-1),
            merge_weight=weight.unsqueeze(-1), new_tokens=1, additive=True, valid=None if out_valid.all() else out_valid,
        )


@register_method(PruMergePlusConfig)
class PruMergePlus(PruMerge):
    description = "LLaVA-PruMerge+: PruMerge's outliers plus uniformly strided spatial samples, merged with key neighbours"

    def select(self, attention: torch.Tensor, kept: int | None) -> torch.Tensor:
        patches = attention.shape[1]
        if kept is not None:
            top = keep_top(attention, max(1, round(kept * IMPORTANT_SHARE)))
            rest = complement(top, patches)  # [B, R] ascending
            spread = kept - top.shape[1]
            slots = torch.arange(spread, device=attention.device) * (rest.shape[1] // max(spread, 1))
            return torch.zeros_like(attention, dtype=torch.bool).scatter_(1, torch.cat([top, rest[:, slots]], dim=1), True)
        selected = super().select(attention, None)
        stride = (patches // selected.sum(dim=1, keepdim=True) // 3).clamp_min(1)  # [B, 1]
        index = torch.arange(patches, device=attention.device)
        return selected | ((index % stride == 0) & (index < patches - 1))
