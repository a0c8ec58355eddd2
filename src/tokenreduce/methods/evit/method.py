"""EViT-style token reorganisation (arXiv 2202.07800, sec. 3.2).

Filter: keep the patches the [CLS] token attends to most (softmax, head mean).
Correlate + compress: all other patches are fused into one new token, weighted
by their [CLS] attention (eq. 4), appended after the kept tokens; later layers
treat it like any token. Encoders without [CLS] (SigLIP) score patches by the
attention they receive instead (METHODS.md sec. 0.4, P4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...budget import geometric_counts, tokens_to_remove
from ...config import BudgetConfig, check_layers, check_range
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import keep_top
from ...ops.merge import TokenPlan, complement
from ...ops.scoring import importance
from ...registry import register_method
from ..base import VitMethod

DEFAULT_KEEP_RATE = 0.7
REFERENCE_LAYERS = (3, 6, 9)  # of a 12-block ViT


@dataclass(frozen=True, kw_only=True)
class EViTConfig(BudgetConfig):
    """EViT settings.

    ``keep_rate`` (default 0.7) is the fraction of patches kept at each pruning
    layer; or give a final budget with ``keep`` / ``ratio`` and the per-layer
    counts are solved to meet it exactly (geometric decay). ``layers`` default to
    the paper's blocks 3, 6, 9 of 12, scaled to the model's depth.
    """

    method = "evit"
    keep_rate: float | None = None
    layers: tuple[int, ...] | None = None
    fuse: bool = True

    def validate(self) -> None:
        super().validate()
        if self.keep_rate is not None:
            check_range(self, "keep_rate", 0.0, 1.0, low_open=True)
            if self.keep is not None or self.ratio is not None:
                raise ConfigError("EViTConfig: give keep_rate or a budget (keep / ratio), not both")
        if self.fuse and self.keep == 0:
            raise ConfigError("EViTConfig: keep=0 is impossible with fuse=True (the fused token remains); use keep >= 1")
        check_layers(self, "layers")


@register_method(EViTConfig)
class EViT(VitMethod):
    description = "EViT: keep top [CLS]-attention patches, fuse the rest into one token"

    def layers(self) -> list[int]:
        config: EViTConfig = self.config
        if config.layers is not None:
            return self.check_layers(config.layers, "layers")
        return sorted({min(self.num_layers - 1, layer * self.num_layers // 12) for layer in REFERENCE_LAYERS})

    def solve(self, reducible: int) -> list[int]:
        config: EViTConfig = self.config
        layers = self.layers()
        fused = 1 if config.fuse else 0
        if config.keep is None and config.ratio is None:
            rate = config.keep_rate if config.keep_rate is not None else DEFAULT_KEEP_RATE
            counts, current = [], reducible
            for _ in layers:
                kept = math.ceil(rate * current)
                current = current if kept == current else kept + fused
                counts.append(current)
        else:
            target = reducible - tokens_to_remove(reducible, config.keep, config.ratio, "EViTConfig")
            counts = geometric_counts(reducible, target, len(layers))
        removals = [before - after for before, after in zip([reducible, *counts], counts)]
        return self.at_layers(layers, removals)

    def plan(self, site: Site) -> TokenPlan:
        fuse = self.config.fuse
        n = site.x.shape[1]
        scores = importance(site.q, site.k, site.scale, site.has_cls)
        keep = keep_top(scores, n - site.protected - site.remove - int(fuse), site.protected)
        if not fuse:
            return TokenPlan(keep=keep)
        discard = complement(keep, n)
        weight = torch.gather(scores, 1, discard).unsqueeze(-1)
        target = torch.full_like(discard, keep.shape[1]).unsqueeze(-1)
        return TokenPlan(keep=keep, merge_src=discard, merge_dst=target, merge_weight=weight, new_tokens=1)
