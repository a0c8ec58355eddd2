"""SparseVLM, v1.5 selection (arXiv 2410.04417, sec. 3.2-3.3; METHODS.md C3).

The relevant text tokens decide which visual tokens matter:

* Raters (sec. 3.2): on the LLM's input embeddings, each visual token's dot
  products with the instruction tokens are softmaxed over the text and averaged
  over the visual tokens; the instruction tokens above the mean relevance rate
  (:func:`~tokenreduce.ops.scoring.text_raters`). They are chosen once per prompt.
* Scores (sec. 3.3): at each pruning layer, the attention of the rater queries of
  *that* layer (softmax over each whole causal row, probe P2 from the layer's q and
  k after RoPE), averaged over heads and raters, restricted to the visual tokens.
* Sparsification: the top-k visual tokens survive from the next layer on, k
  following the official per-layer schedule for the chosen setting: kept tokens
  after layers 2 / 6 / 15 of LLaVA-1.5-7B's 32 are 192 -> (300, 200, 110),
  128 -> (303, 110, 36), 64 -> (66, 30, 17) of 576 ("192 / 128 / 64" are the
  paper's layer-averaged equivalents, issues #29 / #33).

Library decisions: the layers scale with depth, round(l * L / 32), exact at 32
layers; a schedule scales with the visual count, round(k * N / 576), exact at
576. An ``equivalent_tokens`` / ``tflops`` budget (sec. E5) takes the published
schedule nearest the target and scales it by one factor s, round(k * s * N / 576)
(at least 1, at most N), solved so that the budget is met; s = 1 is the published
schedule, reached at its own T_eq: with the cuts after layers 2 / 6 / 15 of 32 that is
202.75 / 140.81 / 79.19 for the "192 / 128 / 64" settings (the labels understate it,
issues #29 / #33), so ``keep`` keeps naming the settings. Survivors keep their original RoPE positions (the reference re-indexes them,
convention 0.5.5). Not implemented: v1.5's recycling of pruned tokens
(DPC-kNN clusters), the v2 mode (SparseVLM+), the re-index compat mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from ...budget import Knob
from ...config import check_layers
from ...errors import ConfigError
from ...ops.merge import gather_tokens, true_indices
from ...ops.scoring import query_rows_attention, text_raters
from ...registry import register_method
from ..inllm import CutSite, Cuts, DecoderBudgetConfig, DecoderMethod, LayerAttention, query_text, top_visual

REFERENCE_LAYERS = (2, 6, 15)
REFERENCE_DEPTH = 32
REFERENCE_VISUAL = 576
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
DEFAULT_SETTING = 192


@dataclass(frozen=True, kw_only=True)
class SparseVLMConfig(DecoderBudgetConfig):
    """SparseVLM v1.5: prune at ``layers`` (default 2 / 6 / 15 of 32, scaled to depth) to the setting's schedule.

    ``keep`` is the paper's token setting (192, 128 or 64, layer-averaged
    equivalents of 576; default 192); or give ``schedule``, the visual tokens kept after each
    pruning layer (absolute counts, non-increasing), or an ``equivalent_tokens`` / ``tflops`` budget.
    """

    method = "sparsevlm"
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "schedule")
    keep: int | None = None
    layers: tuple[int, ...] | None = None
    schedule: tuple[int, ...] | None = None

    def validate(self) -> None:
        super().validate()
        check_layers(self, "layers")
        if self.schedule is None:
            if self.keep is not None and self.keep not in SCHEDULES:
                raise ConfigError(f"SparseVLMConfig: keep={self.keep!r} has no official schedule; use one of {sorted(SCHEDULES)} or give schedule=(...)")
            return
        cuts = len(REFERENCE_LAYERS) if self.layers is None else len(self.layers)
        if not isinstance(self.schedule, tuple) or len(self.schedule) != cuts:
            raise ConfigError(f"SparseVLMConfig: schedule={self.schedule!r} must be a tuple with one kept count per pruning layer ({cuts})")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.schedule):
            raise ConfigError(f"SparseVLMConfig: schedule={self.schedule!r} is invalid; kept counts are ints >= 1")
        if any(later > earlier for earlier, later in zip(self.schedule, self.schedule[1:])):
            raise ConfigError(f"SparseVLMConfig: schedule={self.schedule} must not increase from layer to layer (pruning is progressive)")


@register_method(SparseVLMConfig)
class SparseVLM(DecoderMethod):
    description = "SparseVLM: text raters' attention ranks visual tokens, pruned progressively at 3 layers (in-LLM)"

    @cached_property
    def layers(self) -> tuple[int, ...]:
        """The pruning layers (scored with their own attention; the cut takes effect at the next layer)."""
        layers = self.config.layers
        if layers is None:
            layers = tuple(round(layer * self.num_layers / REFERENCE_DEPTH) for layer in REFERENCE_LAYERS)
            if len(set(layers)) != len(layers):
                raise ConfigError(f"SparseVLMConfig: this {self.num_layers}-layer decoder is too shallow for 3 pruning layers; give layers=(...)")
        for index, layer in enumerate(layers):
            if layer > self.num_layers - 2:
                raise ConfigError(
                    f"SparseVLMConfig: layers[{index}]={layer} is out of range; this model's decoder has layers "
                    f"0..{self.num_layers - 1} and a pruning layer needs a layer after it (<= {self.num_layers - 2})"
                )
        return layers

    def cut_layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.layers)

    def configured_cuts(self, visual: int) -> Cuts:
        config = self.config
        if config.schedule is None:
            return self._scaled(visual, SCHEDULES[DEFAULT_SETTING if config.keep is None else config.keep], 1.0)
        if config.schedule[0] > visual:
            raise ConfigError(f"SparseVLMConfig: schedule={config.schedule} keeps more than the {visual} visual tokens of this input")
        return [(layer + 1, k) for layer, k in zip(self.layers, config.schedule)]

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        """The published schedule whose own T_eq / FLOPs is nearest the target, scaled by s (sec. E5)."""
        nearest = min(SCHEDULES.values(), key=lambda kept: abs(measure(self._scaled(visual, kept, 1.0)) - target))
        return Knob("scale", 0.0, REFERENCE_VISUAL / min(nearest), integer=False, schedule=lambda s: self._scaled(visual, nearest, s))

    def _scaled(self, visual: int, kept: tuple[int, ...], scale: float) -> Cuts:
        """A 576-token schedule ``kept`` times ``scale``, on ``visual`` tokens (each cut keeps 1 .. visual)."""
        return [(layer + 1, max(1, min(visual, round(k * scale * visual / REFERENCE_VISUAL)))) for layer, k in zip(self.layers, kept)]

    def observe_layers(self) -> frozenset[int]:
        return frozenset(self.layers)

    def observe_attention(self, layer: int, attention: LayerAttention) -> Any:
        rows, weight = self._rater_rows(attention)
        query_rows, valid = attention.rows(rows)
        probs = query_rows_attention(query_rows, attention.key, attention.scale, valid)  # [B, R, N]
        return (probs * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True)

    def select(self, site: CutSite) -> torch.Tensor:
        return top_visual(site.observed[site.layer - 1], site.visual, site.keep)

    @staticmethod
    def _rater_rows(attention: LayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """Current indices [B, R] of each sample's raters (padded with its last token) and their weights [B, R].

        A prompt without instruction text after the image is rated by its last token.
        """
        visual = attention.input_visual
        text, text_valid = query_text(attention.input_text, visual)
        images = gather_tokens(attention.inputs, true_indices(visual, int(visual[0].sum())))
        raters = text_raters(images, gather_tokens(attention.inputs, text), text_valid)
        rows = torch.where(raters, text, attention.columns.gather(1, attention.last[:, None]))
        rows = torch.cat([rows, attention.columns.gather(1, attention.last[:, None])], dim=1)
        weight = torch.cat([raters, ~raters.any(dim=1, keepdim=True)], dim=1).float()
        current = _current_index(attention.columns, rows)
        return current, weight


def _current_index(columns: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Current indices [B, R] of tokens given by original column [B, R] (all of them still present)."""
    return (columns[:, None, :] == original[..., None]).to(torch.uint8).argmax(dim=-1)
