"""GlobalCom2 (arXiv 2501.05179; METHODS.md B8): the thumbnail commands how each AnyRes crop is compressed.

Per image (never averaged over a batch), with R = 1 - ``ratio`` the retention ratio
(paper default R = 0.25):

0. Importance a[v, i]: the [CLS] query row of the **last** ViT layer over patch
   keys, mean over heads, pre-softmax logits as in the reference code (probe P1;
   ``score_space="probs"`` for softmax). Features stay those of the feature layer.
1. Thumbnail: keep the top floor(P * R) patches by a[0] (spatial order).
2. Crop budgets (sec. "adaptive compression adjustment"): S_c = the sum of a[0]
   over the thumbnail block crop c covers; sigma = softmax(S / tau);
   r_c = R (1 + sigma_c - 1/n), so mean(r_c) = R.
3. Inside crop c: s = alpha * L2norm(global) + (1 - alpha) * L2norm(local) over its
   tokens left by unpadding, local = a[c], global = a[0] bilinearly upsampled to
   the unpadded canvas; keep the top floor(N_c * r_c).

Newline tokens stay after every canvas row and kept tokens keep their spatial
order (the adapter packs them). Library decisions (METHODS.md B8.2): spatial
order in the thumbnail (the reference sorts by score); a crop whose r_c would
exceed 1 is capped and the surplus goes to the other crops in proportion to r_c,
so the mean stays R (the reference only clips, so its R = 1 drops tokens);
single-view images are compressed to floor(P * R). ``score="neg_cos_to_mean"`` is
the paper's [CLS]-free variant (appendix): a token unlike its view's mean feature
is informative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...config import BudgetConfig, check_choice, check_range
from ...errors import ConfigError
from ...merge_slot import ViewsSite
from ...ops.matching import keep_top
from ...ops.scoring import l2_normalize, row_attention
from ...registry import register_method
from ..base import Method

FLOOR_SLACK = 1e-9  # floor(N * r) of products that are integers in exact arithmetic (144 * 0.25)
CAP_TOLERANCE = 1e-9  # a ratio this close to 1 is a whole crop (R = 1 after redistribution)


@dataclass(frozen=True, kw_only=True)
class GlobalCom2Config(BudgetConfig):
    """``ratio``: fraction of each image's visual tokens removed (the paper's R = 1 - ratio; default R = 0.25).

    ``tau`` softmax temperature over crop scores; ``alpha`` weight of the global
    (thumbnail) score against the crop's own; ``score``: "cls" ([CLS] attention of
    the last ViT layer) or "neg_cos_to_mean" ([CLS]-free); ``score_space``: "logits"
    (reference) or "probs".
    """

    method = "globalcom2"
    ratio: float | None = 0.75
    tau: float = 10.0
    alpha: float = 0.5
    score: str = "cls"
    score_space: str = "logits"

    def validate(self) -> None:
        if self.keep is not None or self.ratio is None:  # before the base check, which would blame the default ratio
            raise ConfigError(
                f"GlobalCom2Config: keep={self.keep!r}, ratio={self.ratio!r}; GlobalCom2 keeps a fraction of every image "
                "(token counts vary with image size): give ratio in [0, 1), the fraction removed, and no keep"
            )
        super().validate()
        check_range(self, "tau", 0.0, math.inf, low_open=True)
        check_range(self, "alpha", 0.0, 1.0)
        check_choice(self, "score", ("cls", "neg_cos_to_mean"))
        check_choice(self, "score_space", ("logits", "probs"))


def crop_retention(crop_scores: torch.Tensor, retention: float, tau: float) -> torch.Tensor:
    """Per-crop retention ratios r_c = R (1 + softmax(S / tau)_c - 1/n), capped at 1 with the mean kept at R.

    crop_scores: [n] float. The uncapped ratios average to R because the softmax
    sums to 1. Capped crops give their surplus to the others in proportion to their
    ratios (repeated until none exceeds 1), so R = 1 keeps every crop whole.
    """
    n = crop_scores.shape[0]
    ratios = retention * (1.0 + (crop_scores.double() / tau).softmax(dim=0) - 1.0 / n)
    capped = torch.zeros(n, dtype=torch.bool, device=ratios.device)
    while True:
        over = ~capped & (ratios >= 1.0 - CAP_TOLERANCE)
        if not bool(over.any()):
            return ratios
        capped |= over
        ratios[capped] = 1.0
        free = ~capped
        if bool(free.any()):
            ratios[free] *= (retention * n - int(capped.sum())) / ratios[free].sum()


def block_sums(scores: torch.Tensor, grid: tuple[int, int], crop_grid: tuple[int, int]) -> torch.Tensor:
    """Sum of thumbnail scores [P] over the block each crop covers, row-major over crops: [n].

    Blocks are floor(rows / n_h) x floor(cols / n_w); the last block row and column
    absorb the remainder (reference ``generate_scale_for_crop_features``).
    """
    rows, cols = grid
    crop_rows, crop_cols = crop_grid
    row_of = (torch.arange(rows) // (rows // crop_rows)).clamp_max(crop_rows - 1)
    col_of = (torch.arange(cols) // (cols // crop_cols)).clamp_max(crop_cols - 1)
    block = (row_of[:, None] * crop_cols + col_of[None, :]).flatten().to(scores.device)
    return scores.new_zeros(crop_rows * crop_cols).index_add_(0, block, scores)


@register_method(GlobalCom2Config)
class GlobalCom2(Method):
    description = "GlobalCom2: thumbnail [CLS] attention sets per-crop budgets and guides top-k inside AnyRes crops"
    sites = frozenset({"anyres"})

    def __init__(self, config: GlobalCom2Config, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        if config.score == "cls" and not facts["has_cls"]:
            raise ConfigError("GlobalCom2Config: score='cls' needs a vision tower with a [CLS] token; use score='neg_cos_to_mean'")
        self.retention = 1.0 - float(config.ratio)

    def scores(self, site: ViewsSite) -> torch.Tensor:
        """Importance of every patch of every view: [V, P] (float32)."""
        if self.config.score == "neg_cos_to_mean":
            features = site.features.float()
            return -F.cosine_similarity(features, features.mean(dim=1, keepdim=True), dim=-1)
        logits = row_attention(site.q, site.k, site.scale, slice(0, 1), probs=self.config.score_space == "probs")
        return logits[:, 0, 1:]

    @staticmethod
    def budget(tokens: int, ratio: float) -> int:
        """floor(tokens * ratio): the paper's k_0 = floor(P R) and k_c = floor(N_c r_c)."""
        return min(tokens, math.floor(tokens * ratio + FLOOR_SLACK))

    def plan_views(self, site: ViewsSite) -> list[torch.Tensor]:
        """Kept patch indices (ascending) of every view: thumbnail, then crops row-major."""
        scores = self.scores(site)
        patches = scores.shape[1]
        thumb = keep_top(scores[:1], self.budget(patches, self.retention))[0]
        if scores.shape[0] == 1:
            return [thumb]
        crops = scores.shape[0] - 1
        ratios = crop_retention(block_sums(scores[0], site.grid, site.crop_grid), self.retention, self.config.tau)
        canvas = site.canvas
        upsampled = F.interpolate(scores[0].view(1, 1, *site.grid), size=tuple(canvas.shape), mode="bilinear", align_corners=False)
        global_scores = scores.new_zeros(crops * patches)
        global_scores[canvas.flatten()] = upsampled.flatten()
        on_canvas = canvas.flatten().sort().values  # crop * P + patch, grouped by crop
        kept = [thumb]
        for crop, ids in enumerate(on_canvas.split(torch.bincount(on_canvas // patches, minlength=crops).tolist())):
            patch = ids - crop * patches
            alpha = self.config.alpha
            score = alpha * l2_normalize(global_scores[ids]) + (1 - alpha) * l2_normalize(scores[crop + 1, patch])
            chosen = keep_top(score[None], self.budget(ids.shape[0], float(ratios[crop])))[0]
            kept.append(patch[chosen])
        return kept
