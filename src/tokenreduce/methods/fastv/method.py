"""FastV (arXiv 2403.06764, sec. 4; METHODS.md C1).

After the first K layers, visual tokens get little attention: score each visual
token by the attention the last prompt token pays it at layer K-1 (softmax over
the whole causal row, mean over heads), keep the top ones, in order, for layers
>= K. Defaults are the paper's headline setting, K = 2 and R = 50 % of the
visual tokens dropped. With a KV cache the cut happens once, at prefill; decode
steps attend the same kept set (the README's cached variant). Survivors keep their
original position ids, as in the reference (C1 step 4); ``positions="compact"``
re-indexes them 0..L'-1 (what a shorter ``inputs_embeds`` gives, convention 0.5.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...ops.scoring import query_rows_attention
from ...registry import register_method
from ..inllm import CutSite, SingleCut, SingleCutConfig, top_visual

DEFAULT_RATIO = 0.5


@dataclass(frozen=True, kw_only=True)
class FastVConfig(SingleCutConfig):
    """Cut at decoder layer ``layer`` (K) keeping ``keep`` visual tokens, or dropping ``ratio`` (R) of them; default K=2, R=0.5."""

    method = "fastv"


@register_method(FastVConfig)
class FastV(SingleCut):
    description = "FastV: drop the visual tokens the last token attends least at layer K-1 (in-LLM)"
    default_ratio = DEFAULT_RATIO

    def observe(self, layer: int, query_rows: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scale: float) -> Any:
        return query_rows_attention(query_rows, key, scale, valid)[:, 0]

    def select(self, site: CutSite) -> torch.Tensor:
        return top_visual(site.observed[site.layer - 1], site.visual, site.keep)
