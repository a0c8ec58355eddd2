"""CDPruner (arXiv 2506.10967, sec. 3; METHODS.md B6) on the projected visual tokens (H3).

* Similarity S: cosine similarity of the projected visual tokens.
* Relevance r: the negated mean cosine similarity of each visual token to the
  prompt's text tokens, min-max normalised per image (sec. 3.3). The text tokens
  are the LLM's own input embeddings of the prompt, which live in the projector's
  output space; the OpenVINO GenAI port does the same instead of the paper's CLIP
  text tower. The adapter supplies them (``Site.text``); without a prompt (e.g.
  vision-only encoding) r = 1 and the selection is pure diversity.
* Sharpening: r <- exp(theta / (2 (1 - theta)) * r), theta = 0.5 by default (the
  OpenVINO port's ``relevance_weight``); ``theta=None`` uses r as is, as the
  original repository (where the sharpening is commented out).
* Kernel L = diag(r) S diag(r); the kept tokens are the greedy MAP subset of the
  DPP with kernel L (fast MAP with incremental Cholesky updates, sec. 3.4), in
  spatial order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BudgetConfig, require_one
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import dpp_greedy_map
from ...ops.merge import TokenPlan
from ...ops.scoring import text_relevance
from ...registry import register_method
from ..base import SingleStep


@dataclass(frozen=True, kw_only=True)
class CDPrunerConfig(BudgetConfig):
    """Keep ``keep`` visual tokens per image (or remove a ``ratio``); ``theta`` in [0, 1) weighs relevance (None: raw)."""

    method = "cdpruner"
    theta: float | None = 0.5

    def validate(self) -> None:
        super().validate()
        require_one(self, ("keep", "ratio"))
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0.0 <= self.theta < 1.0):
            raise ConfigError(f"CDPrunerConfig: theta={self.theta!r} is invalid; a number in [0, 1), or None for raw relevance")


@register_method(CDPrunerConfig)
class CDPruner(SingleStep):
    description = "CDPruner: DPP MAP subset of the projected visual tokens, conditioned on the prompt's relevance"
    sites = frozenset({"projector_output"})
    requires = frozenset({"prompt_text"})  # relevance compares visual tokens with the prompt (Site.text)

    def relevance(self, visual: torch.Tensor, site: Site) -> torch.Tensor:
        """[B, P] per-token quality r of the conditional DPP kernel."""
        if site.text is None:
            return visual.new_ones(visual.shape[:2], dtype=torch.float32)
        raw = text_relevance(visual, site.text.to(visual.device), site.text_mask.to(visual.device))
        theta = self.config.theta
        return raw if theta is None else torch.exp(theta / (2.0 * (1.0 - theta)) * raw)

    def plan(self, site: Site) -> TokenPlan:
        p, (batch, n) = site.protected, site.x.shape[:2]
        visual = site.x[:, p:].float()
        unit = visual / visual.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        quality = self.relevance(visual, site)
        kernel = quality.unsqueeze(2) * (unit @ unit.transpose(-1, -2)) * quality.unsqueeze(1)
        chosen = dpp_greedy_map(kernel, n - p - site.remove) + p
        head = torch.arange(p, device=site.x.device).expand(batch, p)
        return TokenPlan(keep=torch.cat([head, chosen], dim=1))
