"""DART, duplication-aware token reduction (arXiv 2502.11494, sec. 3; METHODS.md C4).

Attention-based importance is biased and needs attention maps; DART keeps a few
pivots and the tokens least duplicated with respect to them. At the cut layer K
(default 2, the LLaVA scripts):

1. pivots: the ``image_pivots`` visual tokens and the ``text_pivots`` tokens of the
   text after the image with the largest L1 norm of their layer-(K-1) keys (after
   RoPE, heads flattened, as read from the reference's KV cache);
2. duplication: cosine similarity of the layer-(K-1) outputs after the decoder's
   final norm;
3. each pivot in turn takes the candidates least similar to it; kept = image
   pivots + picks.

Budget: ``ratio`` (default 0.778, the scripts' reduction_ratio: 576 -> 128) or
``keep``. Library decisions: image pivots count inside the budget and the picks
are split as evenly as possible over the pivots a sample has (remainder to the
first), so every sample keeps exactly the budget (the reference takes
budget // 8 per pivot *plus* the 4 image pivots); pivots take turns in
descending key norm, image pivots first (the reference iterates a Python set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from ...ops.matching import least_duplicated
from ...ops.merge import gather_tokens, last_true, true_indices
from ...registry import register_method
from ..inllm import CutSite, SingleCut, SingleCutConfig, top_visual

DEFAULT_RATIO = 0.778
DEFAULT_PIVOTS = 4


@dataclass(frozen=True, kw_only=True)
class DARTConfig(SingleCutConfig):
    """Cut at ``layer`` keeping ``keep`` visual tokens (or removing ``ratio``, default 0.778) by duplication with pivots."""

    method = "dart"
    image_pivots: int = DEFAULT_PIVOTS
    text_pivots: int = DEFAULT_PIVOTS

    def validate(self) -> None:
        super().validate()
        for name, low in (("image_pivots", 0), ("text_pivots", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"DARTConfig: {name}={value!r} is invalid; expected an int >= {low}")
        if self.image_pivots + self.text_pivots == 0:
            raise ConfigError("DARTConfig: needs at least one pivot (image_pivots + text_pivots >= 1)")


@register_method(DARTConfig)
class DART(SingleCut):
    description = "DART: keep pivots and the visual tokens they duplicate least, keys' L1 norm picks pivots (in-LLM)"
    default_ratio = DEFAULT_RATIO

    def observe(self, layer: int, query_rows: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scale: float) -> Any:
        return key.transpose(1, 2).flatten(2).float().abs().sum(dim=-1)  # [B, N] L1 norm of each token's key

    def select(self, site: CutSite) -> torch.Tensor:
        norms = site.observed[site.layer - 1]
        visual, keep = site.visual, site.keep
        n_image = min(self.config.image_pivots, keep)
        image_pivots = top_visual(norms, visual, n_image) if n_image else visual.new_zeros(visual.shape[0], 0, dtype=torch.long)
        after_image = torch.arange(visual.shape[1], device=visual.device) > last_true(visual)[:, None]
        query_text = site.text & after_image
        n_text = min(self.config.text_pivots, int(query_text.sum(dim=1).max()))
        text_norms = norms.masked_fill(~query_text, -torch.inf)
        text_top = text_norms.topk(n_text, dim=-1)
        text_pivots, has_text = text_top.indices, text_top.values > -torch.inf
        image_order = norms.gather(1, image_pivots).argsort(dim=-1, descending=True)
        pivots = torch.cat([image_pivots.gather(1, image_order), text_pivots], dim=1)
        present = torch.cat([torch.ones_like(image_pivots, dtype=torch.bool), has_text], dim=1)
        picks = _split(keep - n_image, present)
        candidates_mask = visual.clone().scatter_(1, image_pivots, False)
        candidates = true_indices(candidates_mask, int(candidates_mask[0].sum()))
        hidden = site.final_norm(site.hidden)
        chosen = least_duplicated(gather_tokens(hidden, pivots), gather_tokens(hidden, candidates), picks)
        return torch.cat([image_pivots, candidates.gather(1, chosen)], dim=1).sort(dim=-1).values


def _split(total: int, present: torch.Tensor) -> torch.Tensor:
    """[B, P] picks: ``total`` split as evenly as possible over each sample's present pivots, remainder to the first."""
    count = present.sum(dim=1, keepdim=True).clamp_min(1)
    rank = present.cumsum(dim=1) - 1
    picks = total // count + (rank < total % count).long()
    return torch.where(present, picks, 0)
