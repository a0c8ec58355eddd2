"""FiCoCo-V: token reduction inside the vision encoder (arXiv 2411.17686, sec. 3.2; METHODS.md A3).

At each reducing layer, between attention and MLP:

* Filter (eq. 3-4): redundancy s_i = (1 - lambda) * L2norm(v)_i - lambda * L2norm(c)_i,
  with v_i the mean head-averaged logit of patch i over the patch columns (its row;
  ``redundancy_axis="column"`` for the paper's wording) and c_i the [CLS] row
  (or the mean-key query on [CLS]-free encoders, A3.7). A local penalty pushes
  the most redundant token of every 2x2 window of the original grid further
  toward discard (x2), which spreads discards over the image. The r most
  redundant patches are discarded.
* Correlate (eq. 5-6): each discarded token targets the retained patches above
  the epsilon-quantile of its logit row (token-adaptive K), weighted by softmax.
* Compress (eq. 7): self-preserving merge x_j <- (x_j + sum a_ij x_i) / (1 + sum a_ij).

Unlike the reference code (A3.9) decisions are per sample, spatial order and
[CLS] at index 0 are kept, targets are retained tokens only, and the local
penalty uses each token's original grid cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...budget import fit_caps, proportional, tokens_to_remove
from ...config import BudgetConfig, check_choice, check_range
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.matching import keep_top, quantile_fold
from ...ops.merge import TokenPlan, complement, gather_tokens
from ...ops.scoring import attention_logits, grid_cells, l2_normalize, mean_key_logits, window_penalty
from ...registry import register_method
from ..base import VitMethod

REFERENCE_R = 42  # tokens removed per reducing layer in the official code (README example; METHODS.md A3.2)


@dataclass(frozen=True, kw_only=True)
class FiCoCoVConfig(BudgetConfig):
    """FiCoCo-V settings (defaults from the official code, METHODS.md A3).

    Give ``r`` (tokens removed per reducing layer, reference ``REFERENCE_R`` = 42 on CLIP-L) or a
    budget ``keep`` / ``ratio``, solved into an even per-layer schedule.
    Reductions happen at layers ``start_layer`` .. ``stop_layer - 1`` (default: the
    second half of the encoder, as the paper's layers 12-23 of CLIP-L/14).
    """

    method = "ficoco_v"
    r: int | None = None
    start_layer: int | None = None
    stop_layer: int | None = None
    lam: float = 0.35
    window: int = 2
    penalty: float = 2.0
    epsilon: float = 0.998
    redundancy_axis: str = "row"
    merge_into_cls: bool = False
    prop_attn: bool = False

    def validate(self) -> None:
        super().validate()
        given = [n for n in ("r", "keep", "ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(f"FiCoCoVConfig: give exactly one of r=..., keep=... or ratio=... (got {given or 'none'})")
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise ConfigError(f"FiCoCoVConfig: r={self.r!r} is invalid; an int >= 0")
        check_range(self, "lam", 0.0, 1.0)
        check_range(self, "epsilon", 0.0, 1.0)
        check_range(self, "penalty", 1.0, float("inf"))
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"FiCoCoVConfig: window={self.window!r} is invalid; an int >= 1 (1 disables the local penalty)")
        check_choice(self, "redundancy_axis", ("row", "column"))
        for name in ("start_layer", "stop_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"FiCoCoVConfig: {name}={value!r} is invalid; a layer index >= 0")


@register_method(FiCoCoVConfig)
class FiCoCoV(VitMethod):
    description = "FiCoCo-V: redundancy filter with local penalty, quantile correlate, self-preserving merge"

    def __init__(self, config: FiCoCoVConfig, facts: dict) -> None:
        self.prop_attn = self.track_sizes = config.prop_attn
        super().__init__(config, facts)

    def layers(self) -> list[int]:
        config: FiCoCoVConfig = self.config
        start = self.num_layers // 2 if config.start_layer is None else config.start_layer
        stop = self.num_layers if config.stop_layer is None else config.stop_layer
        if not start < stop <= self.num_layers:
            raise ConfigError(f"FiCoCoVConfig: layers {start}..{stop - 1} are not a valid range for {self.num_layers} layers")
        return list(range(start, stop))

    def solve(self, reducible: int) -> list[int]:
        config: FiCoCoVConfig = self.config
        layers = self.layers()
        total = config.r * len(layers) if config.r is not None else tokens_to_remove(reducible, config.keep, config.ratio, "FiCoCoVConfig")
        removals = fit_caps(proportional(total, [1.0] * len(layers)), reducible, lambda n: max(0, n - 1), "FiCoCoVConfig")
        return self.at_layers(layers, removals)

    def plan(self, site: Site) -> TokenPlan:
        config: FiCoCoVConfig = self.config
        p, n = site.protected, site.x.shape[1]
        logits = attention_logits(site.q, site.k, site.scale)  # [B, N, N]
        patch_block = logits[:, p:, p:]
        local = patch_block.mean(dim=-1) if config.redundancy_axis == "row" else patch_block.mean(dim=-2)
        semantic = logits[:, 0, p:] if site.has_cls else mean_key_logits(site.k, site.scale)[:, p:]
        redundancy = (1 - config.lam) * l2_normalize(local) - config.lam * l2_normalize(semantic)
        keep_score = -redundancy
        if config.window > 1:
            cells = grid_cells(site.positions[:, p:], p, site.grid, config.window)
            keep_score = window_penalty(keep_score, cells, config.penalty)
        padded = torch.cat([keep_score.new_full((keep_score.shape[0], p), torch.inf), keep_score], dim=1)
        keep = keep_top(padded, n - p - site.remove, p)
        candidates = torch.cat([keep[:, :1], keep[:, p:]], dim=1) if config.merge_into_cls and site.has_cls else keep[:, p:]
        discard = complement(keep, n)
        rows = gather_tokens(logits, discard)  # [B, D, N]
        correlation = torch.gather(rows, 2, candidates.unsqueeze(1).expand(-1, discard.shape[1], -1))
        return quantile_fold(keep, n, candidates, correlation, config.epsilon)
