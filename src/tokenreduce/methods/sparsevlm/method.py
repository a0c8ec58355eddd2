"""SparseVLM v1.5 and SparseVLM+ (the v2 mode) (arXiv 2410.04417, sec. 3.2-3.4; METHODS.md C3).

The relevant text tokens decide which visual tokens matter:

* Raters (sec. 3.2): on the LLM's input embeddings, each visual token's dot
  products with the instruction tokens are softmaxed over the text and averaged
  over the visual tokens; the instruction tokens above the mean relevance rate
  (:func:`~tokenreduce.ops.scoring.text_raters`). They are chosen once per prompt.
* Scores (sec. 3.3): at each pruning layer, the attention of the rater queries of
  *that* layer (softmax over each whole causal row, probe P2 from the layer's q and
  k after RoPE), averaged over heads and raters, restricted to the visual tokens.
  Mode ``"v2"`` (SparseVLM+) first divides it by the RoPE-only attention and keeps
  only the priority heads (:mod:`.plus`).
* Sparsification: the top-k visual tokens survive from the next layer on, k
  following the official per-layer schedule for the chosen setting: kept tokens
  after layers 2 / 6 / 15 of LLaVA-1.5-7B's 32 are, in v1.5, 192 -> (300, 200, 110),
  128 -> (303, 110, 36), 64 -> (66, 30, 17) of 576, and in v2 192 -> (300, 200, 118),
  128 -> (238, 108, 60), 64 -> (66, 34, 20) ("192 / 128 / 64" are the paper's
  layer-averaged equivalents, issues #29 / #33).
* Recycling (sec. 3.4, v1.5 only, on by default as in the official v1.5 code): a few
  DPC-kNN cluster means of the best pruned tokens survive too (:mod:`.recycling`);
  the cut counts (:meth:`SparseVLM.cuts`, ``stats()``) include them (METHODS.md E4).

Library decisions: the layers scale with depth, round(l * L / 32), exact at 32
layers; a schedule scales with the visual count, round(k * N / 576), exact at
576. An ``equivalent_tokens`` / ``tflops`` budget (sec. E5) takes the mode's published
schedule nearest the target and scales it by one factor s, round(k * s * N / 576)
(at least 1, at most N), solved so that the budget is met, recycled tokens counted;
s = 1 is the published schedule, reached at its own T_eq: without recycling, with
the cuts after layers 2 / 6 / 15 of 32, that is 202.75 / 140.81 / 79.19 for v1.5's
"192 / 128 / 64" settings (the labels understate it, issues #29 / #33), so ``keep``
keeps naming the settings. Survivors keep their original RoPE positions by default
in both modes (convention 0.5.5); the v1.5 reference re-indexes them (C3 step 5),
available in either mode as ``positions="compact"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from ...budget import Knob
from ...config import check_choice, check_layers
from ...errors import ConfigError
from ...ops.merge import TokenPlan, gather_tokens, true_indices
from ...ops.scoring import query_rows_head_attention, rope_only_logits, text_raters
from ...registry import register_method
from ..inllm import CutSite, Cuts, DecoderBudgetConfig, DecoderMethod, LayerAttention, query_text, top_visual
from .plus import gravity_corrected, priority_heads_mean
from .recycling import pruning_count, recycling_plan, with_recycling

REFERENCE_LAYERS = (2, 6, 15)
REFERENCE_DEPTH = 32
REFERENCE_VISUAL = 576
MODES = ("v1.5", "v2")
SCHEDULES = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 64: (66, 34, 20)},
}
DEFAULT_SETTING = 192


@dataclass(frozen=True, kw_only=True)
class SparseVLMConfig(DecoderBudgetConfig):
    """SparseVLM: prune at ``layers`` (default 2 / 6 / 15 of 32, scaled to depth) to the setting's schedule.

    ``mode`` is ``"v1.5"`` (SparseVLM) or ``"v2"`` (SparseVLM+: gravity-corrected
    attention of the priority heads, its own schedules, no recycling). ``keep`` is
    the paper's token setting (192, 128 or 64, layer-averaged equivalents of 576;
    default 192); or give ``schedule``, the visual tokens kept by pruning after each
    pruning layer (absolute counts, non-increasing), or an ``equivalent_tokens`` /
    ``tflops`` budget. ``recycle`` (v1.5 only; None = on in v1.5) also keeps the
    DPC-kNN cluster means of the best pruned tokens, on top of the schedule.
    """

    method = "sparsevlm"
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "schedule")
    mode: str = "v1.5"
    keep: int | None = None
    layers: tuple[int, ...] | None = None
    schedule: tuple[int, ...] | None = None
    recycle: bool | None = None

    @property
    def recycles(self) -> bool:
        """Whether pruned tokens are recycled: ``recycle``, or v1.5's default (on) when None."""
        return self.mode == "v1.5" if self.recycle is None else self.recycle

    def validate(self) -> None:
        super().validate()
        check_choice(self, "mode", MODES)
        check_layers(self, "layers")
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise ConfigError(f"SparseVLMConfig: recycle={self.recycle!r} is invalid; accepted: True, False or None (on in v1.5)")
        if self.recycle and self.mode == "v2":
            raise ConfigError("SparseVLMConfig: recycle=True is invalid with mode='v2'; SparseVLM+ does not recycle (accepted: False or None)")
        if self.schedule is None:
            if self.keep is not None and self.keep not in SCHEDULES[self.mode]:
                raise ConfigError(
                    f"SparseVLMConfig: keep={self.keep!r} has no official {self.mode} schedule; "
                    f"use one of {sorted(SCHEDULES[self.mode])} or give schedule=(...)"
                )
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
            return self._scaled(visual, SCHEDULES[config.mode][DEFAULT_SETTING if config.keep is None else config.keep], 1.0)
        if config.schedule[0] > visual:
            raise ConfigError(f"SparseVLMConfig: schedule={config.schedule} keeps more than the {visual} visual tokens of this input")
        return self._recycled(visual, [(layer + 1, k) for layer, k in zip(self.layers, config.schedule)])

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        """The mode's published schedule whose own T_eq / FLOPs is nearest the target, scaled by s (sec. E5)."""
        nearest = min(SCHEDULES[self.config.mode].values(), key=lambda kept: abs(measure(self._scaled(visual, kept, 1.0)) - target))
        return Knob("scale", 0.0, REFERENCE_VISUAL / min(nearest), integer=False, schedule=lambda s: self._scaled(visual, nearest, s))

    def _scaled(self, visual: int, kept: tuple[int, ...], scale: float) -> Cuts:
        """A 576-token schedule ``kept`` times ``scale``, on ``visual`` tokens (each cut keeps 1 .. visual), recycling added."""
        pruned = [(layer + 1, max(1, min(visual, round(k * scale * visual / REFERENCE_VISUAL)))) for layer, k in zip(self.layers, kept)]
        return self._recycled(visual, pruned)

    def _recycled(self, visual: int, pruned: Cuts) -> Cuts:
        """The pruning schedule's cuts, each plus the tokens it recycles when the config recycles (they survive too)."""
        return with_recycling(visual, pruned) if self.config.recycles else pruned

    def observe_layers(self) -> frozenset[int]:
        return frozenset(self.layers)

    def observe_attention(self, layer: int, attention: LayerAttention) -> Any:
        rows, weight = self._rater_rows(attention)
        query_rows, valid = attention.rows(rows)
        probs = query_rows_head_attention(query_rows, attention.key, attention.scale, valid)  # [B, H, R, N]
        if self.config.mode == "v2":
            batch, _, tokens, dim = attention.query.shape
            ones = attention.query.new_ones(batch, 1, tokens, dim, dtype=torch.float32)
            rotated = attention.rotate(ones, ones)[1][:, 0]  # [B, N, d]: q and k rotate alike
            rope_only = rope_only_logits(gather_tokens(rotated, rows), rotated, dim**-0.5)
            per_row = priority_heads_mean(gravity_corrected(probs, rope_only, attention.visual), weight)
        else:
            per_row = probs.mean(dim=1)
        return (per_row * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True)

    def select(self, site: CutSite) -> torch.Tensor | TokenPlan:
        scores = site.observed[site.layer - 1]
        kept = top_visual(scores, site.visual, pruning_count(int(site.visual[0].sum()), site.keep) if self.config.recycles else site.keep)
        if site.keep == kept.shape[1]:
            return kept
        return recycling_plan(site.hidden, scores, site.visual, kept)


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
