"""FiCoCo-L: token reduction inside the LLM decoder (arXiv 2411.17686, sec. 3.3; METHODS.md C5).

In every decoder layer l > ``start_layer`` (reference ``control_encoding_layer = 4``
of Vicuna-7B's 32 layers), from that layer's head-mean pre-softmax, pre-mask logits
A over the current visual tokens Vis and the instruction tokens Txt (the real text
after the image), computed as blocks from the layer's q and k after RoPE (probe
P2; no eager attention, no full map):

* Filter (C5.2): redundancy s_i = beta * sum_{j in Vis} A[i, j] - (1 - beta) *
  mean_{t in Txt} A_task(i, t), beta = 0.6; the r = 14 most redundant visual tokens
  are discarded. A_task(i, t) = A[t, i] (text query -> visual key, the paper's
  intent) by default; ``task="visual_to_text"`` takes the code's A[i, t]. No L2
  normalisation and no local penalty (unlike FiCoCo-V).
* Correlate (C5.3): C = gamma * A_VV + (1 - gamma) * A_VT A_TV, gamma = 0.6 (direct
  plus indirect correlation through the text). Each discarded token targets the
  retained visual tokens above the epsilon = 0.998 quantile of its row (token-adaptive
  K, self and discarded tokens excluded), weights softmax-normalised to sum to 1.
* Compress (C5.4): self-preserving x_j <- (x_j + sum a_ij x_i) / (1 + sum a_ij) (the
  paper's); ``compress="additive"`` is the code's x_j <- x_j + sum a_ij x_i.

Placement (C5.5, documented deviation): the decoder's layers are not forked, so the
reduction scored by layer l's attention takes effect at the boundary to layer l + 1;
layer l's MLP runs on the unreduced set. The KV caches match the reference's
(layer l holds the full visual span, layer l + 1 on the reduced one), and the last
layer does not reduce (nothing after it would see the result), so with the defaults
on 32 layers the visual tokens drop by r at layers 6..31 (576 -> 212 at layer 31;
the reference's 27th reduction, at layer 31, changes no output). Survivors keep
their original RoPE positions by default (convention 0.5.5); the reference re-indexes
them 0..L'-1 (C5.5), available as ``positions="compact"``, whose decode positions move
back by what each layer's own cache lost rather than by the reference's in-place
edit, which lags each layer's cache by r.
Decisions are per sample and the visual span comes from ``input_ids``.

Budgets (sec. E5): ``keep`` / ``ratio`` split the removal evenly over the reducing
layers (remainder to the earliest); ``equivalent_tokens`` / ``tflops`` solve the
visual count left after the last reduction for that even split (r = (N - keep) /
layers, fractional r spread as whole tokens), with ``start_layer`` fixed: the layers
up to it run on every visual token, so T_eq >= N * (start_layer + 2) / L and a
smaller target needs an earlier ``start_layer``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...budget import Knob, fit_caps, proportional, tokens_to_remove
from ...config import BudgetConfig, check_choice, check_range
from ...errors import ConfigError
from ...ops.matching import keep_top, quantile_fold
from ...ops.merge import TokenPlan, complement, gather_tokens, true_indices
from ...ops.scoring import head_mean_logits
from ...registry import register_method
from ..inllm import CutSite, Cuts, DecoderBudgetConfig, DecoderMethod, LayerAttention, query_text

DEFAULT_R = 14
DEFAULT_START = 4


@dataclass(frozen=True, kw_only=True)
class FiCoCoLConfig(DecoderBudgetConfig, BudgetConfig):
    """FiCoCo-L settings (defaults from the official code and paper, METHODS.md C5 / C6.2).

    Give ``r`` (visual tokens removed per reducing layer, default 14) or a budget:
    ``keep`` = visual tokens left after the last reduction, ``ratio`` = fraction
    removed, split evenly over the reducing layers (layers > ``start_layer``), or
    ``equivalent_tokens`` / ``tflops`` (solved into that even split).
    """

    method = "ficoco_l"
    budget_fields: ClassVar[tuple[str, ...]] = ("r", "keep", "ratio")
    r: int | None = None
    start_layer: int = DEFAULT_START
    beta: float = 0.6
    gamma: float = 0.6
    epsilon: float = 0.998
    task: str = "text_to_visual"
    compress: str = "self_preserving"

    def validate(self) -> None:
        super().validate()
        for name in ("r", "start_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"FiCoCoLConfig: {name}={value!r} is invalid; an int >= 0")
        for name in ("beta", "gamma", "epsilon"):
            check_range(self, name, 0.0, 1.0)
        check_choice(self, "task", ("text_to_visual", "visual_to_text"))
        check_choice(self, "compress", ("self_preserving", "additive"))


@register_method(FiCoCoLConfig)
class FiCoCoL(DecoderMethod):
    description = "FiCoCo-L: visual/text attention filter, direct+indirect correlate, self-preserving merge in every LLM layer"

    def scored_layers(self) -> list[int]:
        """Layers whose attention scores a reduction (start_layer + 1 .. L - 2); each reduction cuts at the next layer."""
        layers = list(range(self.config.start_layer + 1, self.num_layers - 1))
        if not layers:
            raise ConfigError(
                f"FiCoCoLConfig: start_layer={self.config.start_layer} leaves no layer to reduce in this {self.num_layers}-layer "
                f"decoder (reductions score layers start_layer + 1 .. {self.num_layers - 2}); use start_layer <= {self.num_layers - 3}"
            )
        return layers

    def cut_layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.scored_layers())

    def configured_cuts(self, visual: int) -> Cuts:
        config = self.config
        if config.keep is None and config.ratio is None:
            return self._removing(visual, [DEFAULT_R if config.r is None else config.r] * len(self.scored_layers()))
        return self._even(visual, visual - tokens_to_remove(visual, config.keep, config.ratio, "FiCoCoLConfig"))

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        return Knob("keep", min(1, visual), visual, integer=True, schedule=lambda keep: self._even(visual, int(keep)))

    def _even(self, visual: int, keep: int) -> Cuts:
        """Remove visual - keep tokens split evenly over the reducing layers, remainder to the earliest."""
        return self._removing(visual, proportional(visual - keep, [1.0] * len(self.scored_layers())))

    def _removing(self, visual: int, wanted: list[int]) -> Cuts:
        """Cuts removing ``wanted[i]`` tokens at the i-th reduction (each leaves at least one visual token)."""
        removals = fit_caps(wanted, visual, lambda n: max(0, n - 1), "FiCoCoLConfig")
        kept, cuts = visual, []
        for layer, removed in zip(self.scored_layers(), removals):
            kept -= removed
            cuts.append((layer + 1, kept))
        return cuts

    def observe_layers(self) -> frozenset[int]:
        return frozenset(self.scored_layers())

    def observe_attention(self, layer: int, attention: LayerAttention) -> Any:
        """Filter scores [B, V] and correlation [B, V, V] of the current visual tokens from this layer's logit blocks."""
        config = self.config
        count = int(attention.visual[0].sum())
        visual = true_indices(attention.visual, count)
        text, text_valid = query_text(attention.text, attention.visual)
        rows = torch.cat([visual, text], dim=1)
        query, _ = attention.rows(rows)
        key = attention.key.gather(2, rows[:, None, :, None].expand(-1, attention.key.shape[1], -1, attention.key.shape[-1]))
        logits = head_mean_logits(query, key, attention.scale)  # [B, V+T, V+T], pre-softmax, pre-mask
        weight = text_valid.float()
        vv = logits[:, :count, :count]
        vt = logits[:, :count, count:] * weight[:, None, :]
        tv = logits[:, count:, :count] * weight[:, :, None]
        task = tv.sum(dim=1) if config.task == "text_to_visual" else vt.sum(dim=2)
        task = task / weight.sum(dim=1, keepdim=True).clamp_min(1)
        redundancy = config.beta * vv.sum(dim=2) - (1 - config.beta) * task
        correlation = config.gamma * vv + (1 - config.gamma) * (vt @ tv)
        return redundancy, correlation

    def select(self, site: CutSite) -> TokenPlan:
        redundancy, correlation = site.observed[site.layer - 1]
        count, n = redundancy.shape[1], site.hidden.shape[1]
        kept = keep_top(-redundancy, site.keep)  # [B, k] ascending, within the visual tokens
        dropped = complement(kept, count)
        rows = gather_tokens(correlation, dropped)  # [B, D, V]
        scores = rows.gather(2, kept[:, None, :].expand(-1, dropped.shape[1], -1))
        visual = true_indices(site.visual, count)
        targets = visual.gather(1, kept)
        keep = true_indices((~site.visual).scatter(1, targets, True), n - count + site.keep)
        plan = quantile_fold(keep, n, targets, scores, self.config.epsilon)
        return dataclasses.replace(plan, additive=True) if self.config.compress == "additive" else plan
