"""What an in-LLM method is (hooks H4/H5, METHODS.md sec. C): cuts of the visual tokens at decoder layers.

An in-LLM method states *where* it cuts and *how many* visual tokens survive each
cut (:meth:`DecoderMethod.cuts`, from its own knobs or solved from an
``equivalent_tokens`` / ``tflops`` budget through its :meth:`DecoderMethod.knob`,
METHODS.md sec. E4-E5), *what* it must see
of an earlier layer's attention (:meth:`DecoderMethod.observe_attention`, fed by
the attention-function probe with that layer's q and k, :class:`LayerAttention`)
and *which* visual tokens it keeps at a cut (:meth:`DecoderMethod.select`: kept
indices, or a :class:`~tokenreduce.ops.merge.TokenPlan` that also folds the
discarded visual tokens into kept ones through the one merge kernel). Slicing
hidden states, positions, masks and the KV cache is the decoder machinery's job
(``adapters/decoder.py``); methods never see a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch

from ..budget import Knob, solve_knob, tokens_to_remove
from ..config import BudgetConfig, PositionsConfig
from ..errors import ConfigError
from ..measure.flops import transformer_block_flops
from ..ops.merge import TokenPlan, kept_first, last_true
from .base import Method

RowProbe = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
Cuts = list[tuple[int, int]]
TERA = 1e12


@dataclass(frozen=True)
class DecoderShape:
    """The language model's dimensions, all the prefill FLOPs model needs (METHODS.md sec. E2); ``facts["decoder"]``.

    What is counted, per sample and in FLOPs (2 x MACs, sec. E1): the matrix
    products of every decoder layer at the sequence length that layer actually
    runs on, i.e. the q/k/v/o projections (grouped-query K/V narrower), Q K^T and
    A V over the full n x n square (causal masking is not discounted, as in
    ``FlopCounterMode``) and the MLP's ``mlp_matrices`` d x m products. How many
    those are is the architecture's fact (3 for a gated SwiGLU MLP, 2 for a plain
    one), so the adapter that reads the config states it and this only counts. Not counted: the
    LM head (its cost depends on how many logits the caller keeps, not on the
    reduction), embeddings, the vision tower and projector, norms, softmax and
    elementwise ops, and a method's own scoring (probe rows, similarity blocks).
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    mlp_matrices: int

    def layer_flops(self, tokens: int) -> int:
        """FLOPs of one decoder layer's prefill on ``tokens`` tokens (:func:`transformer_block_flops`)."""
        return transformer_block_flops(tokens, self.hidden, self.intermediate, Fraction(self.kv_heads, self.heads),
                                       mlp_matrices=self.mlp_matrices, attention_dim=self.heads * self.head_dim)

    def prefill_flops(self, lengths: Sequence[int]) -> int:
        """FLOPs of one sample's prefill when layer l runs on ``lengths[l]`` tokens (sec. E2: sum over the layers)."""
        return sum(self.layer_flops(n) for n in lengths)


def visual_per_layer(visual: int, cuts: Cuts, layers: int) -> list[int]:
    """Visual tokens each of ``layers`` decoder layers runs on, for ``visual`` tokens in the prompt and these cuts."""
    at, counts, current = dict(cuts), [], visual
    for layer in range(layers):
        current = min(current, at.get(layer, current))
        counts.append(current)
    return counts


def layer_schedule(visual: Sequence[int], real: Sequence[int], cuts: Sequence[Cuts], layers: int, length: int) -> tuple[list[list[int]], list[int]]:
    """Visual tokens of each sample and the batch's sequence length at each of ``layers`` decoder layers.

    visual / real / cuts: each sample's visual tokens, unpadded tokens and cuts; length:
    the batch's (padded) prompt length. The one derivation of lengths per layer,
    shared by the machinery's stats and the FLOPs budget (a single sample of ``real``
    = ``length``), so the two cannot drift apart. Until some sample loses a visual
    token the batch keeps its full length; from then on it is as long as its longest
    sample's live tokens (text and kept visual ones), as the machinery cuts it.
    """
    counts = [visual_per_layer(n, at, layers) for n, at in zip(visual, cuts)]
    sequence = []
    for layer in range(layers):
        cut = any(row[layer] < n for row, n in zip(counts, visual))
        sequence.append(max(t - n + row[layer] for row, n, t in zip(counts, visual, real)) if cut else length)
    return counts, sequence


@dataclass(frozen=True, kw_only=True)
class DecoderBudgetConfig(PositionsConfig):
    """The two budgets every in-LLM config accepts besides its own knobs (METHODS.md sec. E4-E5, convention 0.5.8).

    ``equivalent_tokens``: the layer-averaged visual count T_eq = (1/L) sum_l n_v(l)
    the papers report (sec. E4; merged tokens count as tokens). ``tflops``: the
    language model's prefill TFLOPs (1e12 FLOPs = 2 x MACs) per sample for the prompt
    at hand, as :class:`DecoderShape` counts them (decoder layers only, no LM head).
    Either is solved into the method's schedule (:meth:`DecoderMethod.knob`): the
    schedule whose value is the largest not exceeding the target; a target at or
    above the unreduced model's value runs unreduced, one below the method's reach
    is a :class:`ConfigError` stating the reachable range. A FLOPs target depends
    on the prompt's length, so it is solved (and checked) at the prefill, for each
    sample at its own unpadded length (cached per length).

    ``budget_fields`` names the config's own budget fields: at most one of them and
    these two may be given.

    ``positions`` (:class:`~tokenreduce.config.PositionsConfig`): ``"original"``
    (default, convention 0.5.5) keeps each survivor's RoPE position; ``"compact"``
    re-indexes the survivors contiguously from each cut on and shifts the decode
    positions per stage, as the PDrop, SparseVLM v1.5 and FiCoCo-L references do
    (METHODS.md C2 step 4, C3 step 5, C5.5).
    """

    budget_fields: ClassVar[tuple[str, ...]] = ()
    equivalent_tokens: float | None = None
    tflops: float | None = None

    def validate(self) -> None:
        super().validate()
        for name in ("equivalent_tokens", "tflops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf):
                raise ConfigError(f"{type(self).__name__}: {name}={value!r} is invalid; expected a finite number > 0")
        names = (*self.budget_fields, "equivalent_tokens", "tflops")
        given = [f"{name}={getattr(self, name)!r}" for name in names if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"{type(self).__name__}: give at most one budget of {', '.join(names)}; got {', '.join(given)}")


@dataclass(frozen=True)
class CutSite:
    """Everything a method may read at one cut (the input of decoder layer ``layer``, one prefill).

    hidden: [B, N, C] hidden states entering the layer; columns: [B, N] original
    sequence index of each current token (convention 0.5.2); visual: [B, N] bool, the
    visual tokens still present; text: [B, N] bool, real (unpadded) non-visual
    tokens; query: [B] index of each sample's last real token (the last
    instruction token); keep: visual tokens to keep in every sample; observed: what
    :meth:`DecoderMethod.observe` returned in this prefill, by layer; final_norm: the decoder's final norm; row_probe(): the last token's
    query row and all keys of *this* layer (its input norm, q/k projections and
    RoPE, P2), with the keys that row may see: (q [B, H, 1, d], k [B, H_kv, N, d],
    valid [B, 1, N], scale).

    Every sample of a site has the same number of visual tokens and keeps the same
    number: the machinery hands a batch whose samples differ to the method one
    sample at a time (B = 1), for :meth:`DecoderMethod.observe_attention` as well.
    """

    layer: int
    hidden: torch.Tensor
    columns: torch.Tensor
    visual: torch.Tensor
    text: torch.Tensor
    query: torch.Tensor
    keep: int
    observed: dict[int, Any]
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    row_probe: RowProbe


def visible_keys(attention_mask: torch.Tensor | None, rows: torch.Tensor, queries: int, keys: int) -> torch.Tensor:
    """[B, R, keys] bool: the keys query rows ``rows[b]`` ([B] or [B, R]) may attend, read from the mask the layer received.

    A None mask means plain causal attention (SDPA's ``is_causal``): a row sees the
    keys up to its own position.
    """
    rows = rows.view(rows.shape[0], -1)
    if attention_mask is None:
        limit = rows + (keys - queries)
        return torch.arange(keys, device=rows.device) <= limit[..., None]
    rows_mask = attention_mask[:, 0].expand(rows.shape[0], -1, -1)
    row = rows_mask.gather(1, rows[..., None].expand(-1, -1, attention_mask.shape[-1]))
    return row if row.dtype == torch.bool else row == 0


@dataclass(frozen=True)
class LayerAttention:
    """One decoder layer's attention inputs during a prefill, as the probe sees them (P2, METHODS.md sec. 0.4).

    query [B, H, N, d] and key [B, H_kv, N, d] are the layer's own, after RoPE, for
    the N current tokens; mask is the attention mask the layer received (None =
    plain causal); scale the softmax scale. visual / text: [B, N] bool, the visual
    tokens still present and the real non-visual tokens; last: [B] each sample's
    last real token; columns: [B, N] original column of each current token.
    inputs: [B, L0, C] the decoder's input embeddings before any cut, with
    input_visual / input_text: [B, L0] bool masks over them (for scores defined on
    the prompt, as SparseVLM's raters). rope: (cos, sin) [1 or B, N, d], the rotary
    embedding the layer applied to the current tokens' q and k, as its attention
    module received it (for scores that separate position from content, as
    SparseVLM+'s gravity correction); rope_function(q, k, cos, sin) the model's own RoPE
    function for this layer, which :meth:`rotate` applies at ``rope`` (so a method that
    needs a rotation assumes no layout of its own). Nothing here is an attention map: a
    method computes only the rows and columns its card needs.
    """

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    visual: torch.Tensor
    text: torch.Tensor
    last: torch.Tensor
    columns: torch.Tensor
    inputs: torch.Tensor
    input_visual: torch.Tensor
    input_text: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    rope_function: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def rotate(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k [B, H, N, d] over the current tokens, rotated as this layer rotated its own."""
        return self.rope_function(query, key, *self.rope)

    def rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query rows [B, R] (current indices) -> (q [B, H, R, d], valid [B, R, N] keys each row may see)."""
        heads, dim = self.query.shape[1], self.query.shape[-1]
        picked = self.query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim))
        return picked, visible_keys(self.mask, rows, self.query.shape[2], self.key.shape[2])


class DecoderMethod(Method):
    """Base of in-LLM methods: prefill-time cuts of visual tokens, decode steps follow the pruned cache."""

    sites: ClassVar[frozenset[str]] = frozenset({"llm"})

    def __init__(self, config: Any, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        self._solved: dict[tuple[int, int | None], Cuts] = {}
        self.cut_layers()
        if config.tflops is not None and facts.get("decoder") is None:
            raise ConfigError(f"{type(config).__name__}: tflops needs the decoder's dimensions, which this model's adapter does not describe")
        # None: the count depends on each prompt (AnyRes, dynamic resolution); a FLOPs budget also needs the prompt's length
        if facts["reducible_tokens"] is not None and config.tflops is None:
            self.cuts(facts["reducible_tokens"])

    def cut_layers(self) -> tuple[int, ...]:
        """The layers where cuts take effect, validated against the decoder's depth (they do not depend on the prompt)."""
        raise NotImplementedError

    def cuts(self, visual: int, length: int | None = None) -> Cuts:
        """(layer, visual tokens kept from that layer on) for a prompt of ``length`` tokens with ``visual`` visual ones per sample.

        Called at apply when the adapter knows the count, else at each prefill: a
        budget the prompt cannot meet raises :class:`ConfigError` there, before
        anything runs. ``length`` is needed by a ``tflops`` budget only.

        Cached per (visual, length), the length only under a ``tflops`` budget: the
        config is frozen and ``configured_cuts`` / ``knob`` are pure, and a prefill
        would otherwise re-solve a budget (a FLOPs solve costs tens of milliseconds on
        a deep decoder) for every prompt of a count it has already seen.
        """
        key = (visual, length if self.config.tflops is not None else None)
        if key not in self._solved:
            self._solved[key] = self._uncached_cuts(visual, length)
        return list(self._solved[key])

    def _uncached_cuts(self, visual: int, length: int | None) -> Cuts:
        """:meth:`cuts` solved afresh."""
        config = self.config
        if config.equivalent_tokens is None and config.tflops is None:
            return self.configured_cuts(visual)
        if config.tflops is None:
            return self._solve(visual, "equivalent_tokens", config.equivalent_tokens, 1.0, lambda cuts: self.equivalent_tokens(visual, cuts),
                               f"{visual} visual tokens")
        if length is None:
            raise ValueError(f"tokenreduce: {type(config).__name__}(tflops=...) is solved per prompt and needs its length")
        return self._solve(visual, "tflops", config.tflops, TERA, lambda cuts: self.prefill_flops(visual, length, cuts),
                           f"{visual} visual tokens of {length}")

    def configured_cuts(self, visual: int) -> Cuts:
        """:meth:`cuts` from the method's own knobs (keep, ratio, lambda, schedule, r, or its defaults)."""
        raise NotImplementedError

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        """The one-parameter family a T_eq or FLOPs budget is solved over (METHODS.md sec. E5), for ``visual`` tokens.

        Methods with several families (SparseVLM's published schedules) pick the one
        whose reference point ``measure`` puts nearest ``target``.
        """
        raise NotImplementedError

    def equivalent_tokens(self, visual: int, cuts: Cuts) -> float:
        """T_eq of these cuts: the visual tokens each decoder layer runs on, averaged over the layers (sec. E4)."""
        return sum(visual_per_layer(visual, cuts, self.num_layers)) / self.num_layers

    def prefill_flops(self, visual: int, length: int, cuts: Cuts) -> int:
        """One sample's decoder prefill FLOPs for a ``length``-token prompt with ``visual`` visual tokens (:class:`DecoderShape`)."""
        return self.facts["decoder"].prefill_flops(layer_schedule([visual], [length], [cuts], self.num_layers, length)[1])

    def _solve(self, visual: int, field: str, target: float, unit: float, measure: Callable[[Cuts], float], prompt: str) -> Cuts:
        """The generic budget solver: the knob's schedule whose ``measure`` is the largest not above ``target * unit``.

        ``prompt`` describes the prompt for the error that states the reachable range.
        """
        knob = self.knob(visual, measure, target * unit)
        solved = solve_knob(knob, measure, target * unit)
        if solved is None:
            ends = [(measure(knob.schedule(x)) / unit, x) for x in (knob.low, knob.high)]
            reach = " to ".join(f"{value:.4g} ({knob.name}={x:g})" for value, x in ends)
            first = min(self.cut_layers())
            raise ConfigError(
                f"{type(self.config).__name__}: {field}={target:g} is out of reach for this prompt ({prompt}): "
                f"its schedules reach {field} {reach}, cutting from layer {first} of a {self.num_layers}-layer decoder; "
                f"the layers before the first cut see all {visual} visual tokens"
            )
        return solved[1]

    def observe_layers(self) -> frozenset[int]:
        """Layers whose attention call must report to :meth:`observe` during a prefill."""
        return frozenset()

    def observe(self, layer: int, query_rows: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scale: float) -> Any:
        """Keep what :meth:`select` needs from layer ``layer``'s attention (the last token's row q [B, H, 1, d], keys)."""
        raise NotImplementedError

    def observe_attention(self, layer: int, attention: LayerAttention) -> Any:
        """Keep what :meth:`select` needs from layer ``layer``'s q and k; by default the last token's row (:meth:`observe`).

        Methods scored by several query rows (SparseVLM's raters) or by visual/text
        blocks (FiCoCo-L) override this and take what they need from ``attention``.
        """
        query_rows, valid = attention.rows(attention.last[:, None])
        return self.observe(layer, query_rows, attention.key, valid, attention.scale)

    def select(self, site: CutSite) -> torch.Tensor | TokenPlan:
        """The cut: [B, site.keep] indices (into the current sequence) of the visual tokens that survive, or a plan.

        A :class:`TokenPlan` over the current sequence must keep every non-visual
        token and ``site.keep`` visual ones, append no tokens, and may fold the
        discarded visual tokens into kept tokens (``merge_src`` / ``merge_dst``).
        """
        raise NotImplementedError

    def check_cut_layer(self, layer: int, field: str) -> int:
        """A cut needs a layer before it (the scores come from layer K-1 or K's input) and must exist."""
        if not 1 <= layer < self.num_layers:
            raise ConfigError(
                f"{type(self.config).__name__}: {field}={layer} is out of range; this model's decoder has layers "
                f"0..{self.num_layers - 1} and a cut needs 1 <= {field} <= {self.num_layers - 1}"
            )
        return layer


DEFAULT_CUT_LAYER = 2  # FastV's and DART's K


@dataclass(frozen=True, kw_only=True)
class SingleCutConfig(DecoderBudgetConfig, BudgetConfig):
    """A budget plus the decoder layer ``layer`` (K) where one cut happens; scores come from layer K-1."""

    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "ratio")
    layer: int = DEFAULT_CUT_LAYER

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(
                f"{type(self).__name__}: layer={self.layer!r} is invalid; the cut layer K is an int >= 1 (scores come from layer K-1)"
            )


class SingleCut(DecoderMethod):
    """One cut at the config's ``layer`` K, scored at layer K-1 (FastV, DART): ``keep`` / ``ratio`` or ``default_ratio``.

    Budget knob (sec. E5): the kept count at K, an integer from 0 to all of them;
    FastV's T_eq is (K * N + (L - K) * keep) / L (sec. E4), its FLOPs the sec. E2 sum.
    """

    default_ratio: ClassVar[float]

    def cut_layers(self) -> tuple[int, ...]:
        return (self.check_cut_layer(self.config.layer, "layer"),)

    def configured_cuts(self, visual: int) -> Cuts:
        config = self.config
        ratio = self.default_ratio if config.keep is None and config.ratio is None else config.ratio
        return self._keeping(visual - tokens_to_remove(visual, config.keep, ratio, type(config).__name__))

    def knob(self, visual: int, measure: Callable[[Cuts], float], target: float) -> Knob[Cuts]:
        return Knob("keep", 0, visual, integer=True, schedule=lambda keep: self._keeping(int(keep)))

    def _keeping(self, keep: int) -> Cuts:
        return [(self.config.layer, keep)]

    def observe_layers(self) -> frozenset[int]:
        return frozenset({self.config.layer - 1})


def top_visual(scores: torch.Tensor, visual: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring visual tokens per sample: scores [B, N], visual [B, N] bool -> [B, keep] ascending."""
    return scores.float().masked_fill(~visual, -torch.inf).topk(keep, dim=-1).indices.sort(dim=-1).values


def query_text(text: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The instruction: real text tokens after each sample's last visual token, [B, T] indices and [B, T] validity.

    Samples have different instruction lengths, so rows are padded (``valid`` False) to the longest one.
    """
    after = torch.arange(visual.shape[1], device=visual.device) > last_true(visual)[:, None]
    return kept_first(text & after)
