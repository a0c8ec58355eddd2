"""What an in-LLM method is (hooks H4/H5, METHODS.md sec. C): cuts of the visual tokens at decoder layers.

An in-LLM method states *where* it cuts and *how many* visual tokens survive each
cut (:meth:`DecoderMethod.cuts`, solved from the user's budget), *what* it must see
of an earlier layer's attention (:meth:`DecoderMethod.observe_attention`, fed by
the attention-function probe with that layer's q and k, :class:`LayerAttention`)
and *which* visual tokens it keeps at a cut (:meth:`DecoderMethod.select`: kept
indices, or a :class:`~tokenreduce.ops.merge.TokenPlan` that also folds the
discarded visual tokens into kept ones through the one merge kernel). Slicing
hidden states, positions, masks and the KV cache is the decoder machinery's job
(``adapters/decoder.py``); methods never see a module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..budget import tokens_to_remove
from ..config import BudgetConfig
from ..errors import ConfigError
from ..ops.merge import TokenPlan, kept_first, last_true
from .base import Method

RowProbe = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]


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
    the prompt, as SparseVLM's raters). Nothing here is an attention map: a
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
        self.cut_layers()
        if facts["reducible_tokens"] is not None:  # None: the count depends on each prompt (AnyRes, dynamic resolution)
            self.cuts(facts["reducible_tokens"])

    def cut_layers(self) -> tuple[int, ...]:
        """The layers where cuts take effect, validated against the decoder's depth (they do not depend on the prompt)."""
        raise NotImplementedError

    def cuts(self, visual: int) -> list[tuple[int, int]]:
        """(layer, visual tokens kept from that layer on) for a prompt with ``visual`` visual tokens per sample.

        Called at apply when the adapter knows the count, else at each prefill: a
        budget the prompt cannot meet raises :class:`ConfigError` there, before
        anything runs.
        """
        raise NotImplementedError

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
class SingleCutConfig(BudgetConfig):
    """A budget plus the decoder layer ``layer`` (K) where one cut happens; scores come from layer K-1."""

    layer: int = DEFAULT_CUT_LAYER

    def validate(self) -> None:
        super().validate()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(
                f"{type(self).__name__}: layer={self.layer!r} is invalid; the cut layer K is an int >= 1 (scores come from layer K-1)"
            )


class SingleCut(DecoderMethod):
    """One cut at the config's ``layer`` K, scored at layer K-1 (FastV, DART): ``keep`` / ``ratio`` or ``default_ratio``."""

    default_ratio: ClassVar[float]

    def cut_layers(self) -> tuple[int, ...]:
        return (self.check_cut_layer(self.config.layer, "layer"),)

    def cuts(self, visual: int) -> list[tuple[int, int]]:
        config = self.config
        ratio = self.default_ratio if config.keep is None and config.ratio is None else config.ratio
        return [(config.layer, visual - tokens_to_remove(visual, config.keep, ratio, type(config).__name__))]

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
