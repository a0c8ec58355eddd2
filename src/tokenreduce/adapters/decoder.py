"""In-LLM token reduction on a RoPE decoder stack (hooks H4/H5, METHODS.md sec. C and sec. 0.5.5-0.5.7).

Written against the decoder-layer interface shared by the Llama family in
transformers (Llama, Mistral, Qwen2, ...): a decoder model with ``layers`` (each
``layer(hidden_states, attention_mask=, position_embeddings=, position_ids=,
past_key_values=, ...)`` with ``input_layernorm`` and ``self_attn.{q,k}_proj``) and a
final ``norm``. Multimodal adapters call :func:`attach_decoder` and report each
prompt's visual tokens with :meth:`DecoderRun.expect_visual`.

How a prefill is cut. Nothing of the model's code is copied; forward pre-hooks
on the decoder layers rewrite their inputs:

* At a cut layer K the method picks the surviving visual tokens per sample; the
  hidden states entering K are gathered. Text always survives.
* Samples may hold different numbers of visual tokens (AnyRes images of different
  sizes, several images in one sample, none), and each keeps what the method's
  ``cuts()`` gives for its own count (and, under a ``tflops`` budget, its own
  unpadded length). The batch stays rectangular: after a cut it
  is as long as its longest sample's live tokens (text and kept visual ones), and
  every shorter sample fills up with its other columns: its padding first, then
  earlier fillers and the tokens just removed, in sequence order. Fillers are
  *dead*: zeroed in the 2-D mask every later layer's mask is built from, in the
  prefill and at every decode step, and never visual or text to a method again,
  so the live tokens attend exactly as in the sample's own run. A padded batch
  whose samples share the visual count and cuts keeps exactly its padding as
  fillers. Methods score rectangular blocks of visual tokens and keep one count
  per site, so a batch with different counts or cuts is scored and cut sample by
  sample, each on its own slice (decisions are per sample anyway, convention
  0.5.7); a batch whose samples share them runs every method call once for the
  whole batch.
* Every layer >= K then receives, instead of the model's full-length tensors,
  the position embeddings (cos, sin) and position ids *gathered* at the
  survivors' original columns (survivors keep their RoPE positions, convention
  0.5.5) and a causal mask built for that layer with ``create_causal_mask(...,
  layer_idx=K)`` from the 2-D padding mask gathered the same way.
* The KV cache (a ``DynamicCache``) holds per-layer lengths by itself: layers < K
  store the full prompt, layers >= K only the survivors. Its length for layer 0
  stays the full prompt length, so ``generate()`` continues the positions from
  the original length.
* At each decode step on that cache, the 2-D mask is gathered at (survivor
  columns, decode columns), dead columns zeroed, and a mask is rebuilt for the
  first layer of every stage from that layer's cache length (convention 0.5.6).
  Each layer runs once per forward; nothing is re-run to obtain scores.
* ``positions="compact"`` (the method config's, METHODS.md C2 "Paper vs code /
  library", C3 step 5, C5.5; convention 0.5.5) reproduces the references, which
  build a shorter sequence and number it 0..L'-1: from each cut on, a token's
  position id is its original one less the real tokens removed before it
  (:func:`compact_ids`; with generate's ids, which count only real tokens, the
  live tokens of every sample get 0..L'-1 whatever the padding), and the cut
  layers' (cos, sin) are computed for those ids by the decoder's own
  ``rotary_emb``. At a decode step the layers of each stage take the model's
  decode position less the real tokens removed before that stage, so prefill and
  decode agree stage by stage (the reference shifts decode positions per stage,
  C2 step 4). Layers before the first cut keep the original positions. Only
  decoders with 1-D positions can be re-indexed; the adapters say which
  (``Adapter.position_modes``: LLaVA and LLaVA-NeXT, not Qwen-VL's M-RoPE).
* The decoder's output covers the survivors (and dead columns) only, so a
  prefill's logits are shorter than the prompt (as in FastV's inplace mode);
  ``stats()`` reports the sequence length at every layer, and from it the prefill
  FLOPs (:class:`~tokenreduce.methods.inllm.DecoderShape`, whose dimensions
  :func:`decoder_shape` reads for the adapters' ``facts["decoder"]``).

Scores. The LLM's attention implementation is switched to ``tokenreduce_sdpa``
(registered in transformers' ``AttentionInterface`` and, with the SDPA mask
builder, in ``AttentionMaskInterface``): it calls the registered ``sdpa`` function
unchanged and, at the layers a method observes during a prefill, hands the
method the layer's queries and keys (after RoPE) with the current visual and
text masks (:class:`~tokenreduce.methods.inllm.LayerAttention`), from which it
computes only what its card needs: the last token's row (FastV), key norms
(DART), the rows of the text raters (SparseVLM), or the visual x visual, visual x
text and text x visual blocks (FiCoCo-L). The full attention map is never
formed. A method that scores a cut with the cut layer's *own*
attention (PyramidDrop) cannot wait for that layer to run; it gets probe P2
instead: the layer's input norm, q/k projections and RoPE applied to the hidden
states entering it, for the last token's row only (:func:`_row_probe`).

Merging. A method's cut may return a :class:`~tokenreduce.ops.merge.TokenPlan`
instead of kept indices: the hidden states entering the cut layer then go
through :func:`~tokenreduce.ops.merge.apply_plan` (the one merge kernel), so the
discarded visual tokens are folded into kept ones (FiCoCo-L) rather than only
dropped; positions, masks and the cache follow the plan's kept tokens as they
follow a plain cut.

``remove()`` restores the implementation name and every hook.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import OVERHEAD_LABEL
from ..methods.inllm import CutSite, DecoderMethod, DecoderShape, LayerAttention, layer_schedule, visible_keys
from ..ops.merge import TokenPlan, apply_plan, gather_tokens, last_true, output_index, true_indices
from .base import Undo

PROBE_ATTENTION = "tokenreduce_sdpa"
_OBSERVERS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def probe_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The ``tokenreduce_sdpa`` attention function: transformers' SDPA, plus a look at q and k where a method asks."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    output = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    observer = _OBSERVERS.get(module)
    if observer is not None:
        observer(query, key, attention_mask, kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return output


def _register_probe_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PROBE_ATTENTION, probe_attention)
    AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


def decoder_shape(config: Any) -> DecoderShape:
    """The dimensions of a Llama-family decoder from its (text) config, for ``facts["decoder"]`` (FLOPs budgets and stats).

    The family's MLP is gated (SwiGLU: gate, up and down projections), hence three
    d x m matrices; the methods' FLOPs count takes that from here, not from a guess.
    """
    heads = config.num_attention_heads
    return DecoderShape(
        hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, layers=config.num_hidden_layers,
        mlp_matrices=3,
    )


def last_real_token(mask2d: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B] index of each sample's last unpadded token (left or right padding)."""
    if mask2d is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    return last_true(mask2d.bool())


class Stage(NamedTuple):
    """The tokens that layers from ``first`` on hold, for decode steps to follow.

    ``attended`` is the stage's part of every decode step's 2-D mask, fixed at the
    cut, so that a step only appends its own columns to it.
    """

    first: int
    width: int  # n, the tokens the stage's layers hold
    attended: torch.Tensor | None  # [B, n] 2-D mask of the stage's tokens: padding and dead columns 0 (None: all attended)
    shift: torch.Tensor | None  # [B] real tokens removed before this stage, which its decode positions move back by (None: original positions)


@dataclass
class Prefill:
    """A cut prompt, so that decode steps on the same cache can follow it."""

    cache: Any  # weakref to the KV cache the cut prefill filled
    length: int  # prompt length before any cut
    stages: list[Stage]
    stage_at: list[Stage | None]  # layer -> the stage it belongs to (None: before the first cut)


@dataclass
class Pass:
    """One forward of the decoder in progress (prefill being cut, or a decode step on a cut cache)."""

    decode: bool
    mask2d: torch.Tensor | None  # [B, L] the model's 2-D padding mask (full length)
    columns: torch.Tensor | None = None  # [B, N] original column of each current token (prefill)
    visual: torch.Tensor | None = None  # [B, N] bool, the live visual tokens
    dead: torch.Tensor | None = None  # [B, N] bool, fillers: columns kept only so that the batch stays rectangular
    query: torch.Tensor | None = None  # [B] last real token, current index
    cuts: dict[int, list[int]] = field(default_factory=dict)  # layer -> visual tokens each sample keeps from it on
    ragged: bool = False  # samples have different visual counts or cuts (a tflops budget at different lengths): scored and cut sample by sample
    attention_mask: Any = None  # the mask of the current stage
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    cut: bool = False
    observed: dict[int, Any] = field(default_factory=dict)
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (cos, sin) each observed layer applied
    stages: list[Stage] = field(default_factory=list)
    past: int = 0  # decode: tokens in layer 0's cache before this step
    length: int = 0  # prefill: prompt length before any cut
    inputs: torch.Tensor | None = None  # prefill: [B, L, C] the decoder's input embeddings
    input_visual: torch.Tensor | None = None  # prefill: [B, L] bool, visual tokens of the prompt
    input_real: torch.Tensor | None = None  # prefill: [B, L] bool, the prompt's unpadded tokens
    input_text: torch.Tensor | None = None  # prefill: [B, L] bool, its unpadded non-visual tokens
    # prefill, changed only by a cut (every observed layer and cut between two cuts reads them):
    attended: torch.Tensor | None = None  # [B, N] 2-D mask of the current tokens: padding and dead columns 0 (None: all attended)
    text: torch.Tensor | None = None  # [B, N] bool, the current real (unpadded, live) non-visual tokens

    def settle(self) -> None:
        """Derive ``attended`` and ``text`` from the current columns, visual and dead tokens (at the prefill's start and after each cut)."""
        padding = self.mask2d.gather(1, self.columns) if self.mask2d is not None else None
        if bool(self.dead.any()):
            padding = (~self.dead).long() if padding is None else padding * ~self.dead
        self.attended = padding
        self.text = (padding.bool() if padding is not None else torch.ones_like(self.visual)) & ~self.visual


@dataclass
class DecoderRun:
    """Run state of an in-LLM method: the forward in progress, the last cut prefill, and what it did."""

    method: DecoderMethod
    decoder: nn.Module
    layers: list[nn.Module]
    compact: bool = False  # positions="compact": survivors re-indexed from each cut on (see the module docstring)
    pending_visual: torch.Tensor | None = None
    current: Pass | None = None
    prefill: Prefill | None = None
    prefills: int = 0
    batch: int = 0  # samples in the last prefill
    images: int = 0
    visual_in: list[int] = field(default_factory=list)  # per sample
    visual_per_sample: list[list[int]] = field(default_factory=list)  # [B][layer]
    sequence_per_layer: list[int] = field(default_factory=list)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (columns, visual) after its cut
    kv_cache_bytes: int | None = None  # held by the cache after the last forward (None without a cache)

    def expect_visual(self, visual: torch.Tensor | None) -> None:
        """The adapter's report for the next decoder forward: [B, N] bool visual tokens (None: unknown, no cut)."""
        self.pending_visual = visual

    def stats(self) -> dict[str, Any]:
        """What the last prefill did: visual tokens and sequence length per layer, T_eq (METHODS.md sec. E4), cache, FLOPs.

        The batch-level keys are per sample's when every sample has the same visual
        count. In a batch whose samples have different visual counts,
        ``visual_tokens_in`` lists them, ``visual_tokens_per_layer`` is the mean over
        samples (so ``equivalent_tokens`` is the batch mean) and
        ``visual_tokens_per_sample`` gives each sample's layers. ``images`` counts the
        samples with visual tokens; ``sequence_per_layer`` is the batch's length (the
        KV cache's) at each layer. ``prefill_flops`` / ``prefill_flops_full`` are that
        prefill's decoder FLOPs for the whole batch at that length with and without
        the reduction, in the scope :class:`DecoderShape` documents (decoder layers'
        matrix products at each layer's length; no LM head, no scoring),
        ``prefill_flops_ratio`` their quotient; all None before a prefill or without
        ``facts["decoder"]``.
        """
        layers = len(self.layers)
        samples = self.visual_per_sample or [[0] * layers]
        uniform = all(row == samples[0] for row in samples)
        visual = samples[0] if uniform else [sum(column) / len(samples) for column in zip(*samples)]
        stats: dict[str, Any] = {
            "images": self.images,
            "visual_tokens_in": visual[0] if uniform else list(self.visual_in),
            "visual_tokens_out": [row[-1] for row in self.visual_per_sample],
            "visual_tokens_per_layer": list(visual),
            "visual_tokens_per_sample": [list(row) for row in self.visual_per_sample],
            "sequence_per_layer": list(self.sequence_per_layer),
            "equivalent_tokens": sum(visual) / layers,
            "kv_cache_bytes": self.kv_cache_bytes,
            **self._flops(),
            "kept": {layer: [row[visual].tolist() for row, visual in zip(columns, visuals)] for layer, (columns, visuals) in self.kept.items()},
            "prefills": self.prefills,
        }
        if self.images == 0 and self.prefills:
            stats["note"] = "no image in the last prompt: nothing to reduce"
        return stats

    def _flops(self) -> dict[str, Any]:
        shape: DecoderShape | None = self.method.facts.get("decoder")
        if shape is None or not self.sequence_per_layer:
            return {"prefill_flops": None, "prefill_flops_full": None, "prefill_flops_ratio": None}
        reduced = self.batch * shape.prefill_flops(self.sequence_per_layer)
        full = self.batch * shape.prefill_flops([self.sequence_per_layer[0]] * len(self.layers))  # layer 0 is never cut
        return {"prefill_flops": reduced, "prefill_flops_full": full, "prefill_flops_ratio": reduced / full}

    def reset(self) -> None:
        self.current, self.prefill, self.prefills = None, None, 0
        self.visual_per_sample, self.sequence_per_layer, self.kept = [], [], {}

    def begin(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Decoder pre-hook: classify the forward as a cut prefill, a decode step on a cut cache, or a pass-through."""
        visual, self.pending_visual = self.pending_visual, None
        cache = kwargs.get("past_key_values")
        mask2d = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        length = tokens.shape[1]
        self.current = None
        prefill = self.prefill
        if prefill is not None and cache is not None and prefill.cache is not None and prefill.cache() is cache:
            self.current = Pass(decode=True, mask2d=mask2d, past=cache.get_seq_length())
            return
        if visual is not None and visual.shape[1] != length:
            raise RuntimeError(
                f"tokenreduce: the adapter reported visual tokens of a {visual.shape[1]}-token prompt but the decoder got "
                f"{length} tokens; the report must come from the call that feeds the decoder (after any vision-side shortening)"
            )
        has_image = visual is not None and bool(visual.any())
        if cache is not None and cache.get_seq_length() > 0:
            if has_image:
                raise ValueError("tokenreduce: an image in a prompt that continues an existing KV cache is not supported")
            return
        self.prefills += 1
        self.batch = tokens.shape[0]
        self.prefill, self.kept, self.kv_cache_bytes = None, {}, None
        self.images, self.visual_in, self.visual_per_sample = 0, [], []
        self.sequence_per_layer = [length] * len(self.layers)
        if not has_image:
            return
        _check_cache(cache)
        counts = visual.sum(dim=1).tolist()
        real = mask2d.sum(dim=1).tolist() if mask2d is not None else [length] * len(counts)
        cuts = self._cuts(counts, real)
        self.images, self.visual_in = sum(n > 0 for n in counts), counts
        self._record_schedule(counts, real, length, cuts)
        if all(keep >= n for sample, n in zip(cuts, counts) for keep in sample.values()):
            return
        batch, device = visual.shape[0], visual.device
        inputs = embeds if embeds is not None else self.decoder.get_input_embeddings()(kwargs.get("input_ids", args[0] if args else None))
        real_tokens = mask2d.bool() if mask2d is not None else torch.ones_like(visual)
        self.current = Pass(
            decode=False, mask2d=mask2d, visual=visual, dead=torch.zeros_like(visual),
            columns=torch.arange(length, device=device).expand(batch, length),
            query=last_real_token(mask2d, batch, length, device), cuts={layer: [sample[layer] for sample in cuts] for layer in cuts[0]},
            ragged=len({(n, tuple(at.values())) for n, at in zip(counts, cuts)}) > 1, length=length, inputs=inputs, input_visual=visual,
            input_real=real_tokens, input_text=real_tokens & ~visual,
        )
        self.current.settle()

    def _cuts(self, counts: list[int], real: list[int]) -> list[dict[int, int]]:
        """Each sample's cuts {layer: visual tokens kept from that layer on}, solved for its visual count and real length.

        ``real``: each sample's unpadded tokens. A ``tflops`` budget is solved for the
        sample's own prompt, not the padded batch's length, so that a sample cuts in a
        batch as in its own run (convention 0.5.7); other budgets ignore the length
        and the method caches each solve. A budget a sample cannot meet raises the
        method's ConfigError here, before any layer runs. A sample without visual
        tokens has nothing to cut (it keeps 0 at every cut layer). Cut layers never
        depend on the prompt, so one set of layers serves the batch.
        """
        solved = {(n, t): dict(self.method.cuts(n, t)) for n, t in sorted(set(zip(counts, real))) if n > 0}
        layers = {tuple(cuts) for cuts in solved.values()}
        if len(layers) > 1:
            raise RuntimeError(f"tokenreduce: {type(self.method).__name__}.cuts() names different layers for different prompts: {sorted(layers)}")
        empty = dict.fromkeys(layers.pop(), 0)
        return [solved.get(key, empty) for key in zip(counts, real)]

    def _record_schedule(self, counts: list[int], real: list[int], length: int, cuts: list[dict[int, int]]) -> None:
        """Visual tokens of each sample and the batch's length at every layer (:func:`layer_schedule`).

        ``real``: each sample's unpadded tokens.
        """
        self.visual_per_sample, self.sequence_per_layer = layer_schedule(
            counts, real, [list(at.items()) for at in cuts], len(self.layers), length)

    def enter(self, layer: int, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Decoder-layer pre-hook: cut at a cut layer, then hand every later layer the sliced inputs."""
        run = self.current
        if run is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if run.decode:
            return self._follow(layer, hidden, args, kwargs)
        if layer in run.cuts:  # the counts entering and leaving the cut, as begin's schedule predicted them
            counts = [row[layer - 1] for row in self.visual_per_sample]
            keep = [row[layer] for row in self.visual_per_sample]
            if keep != counts:
                hidden = self._cut(layer, hidden, kwargs, keep, counts)
        if not run.cut:
            return None
        kwargs.update(attention_mask=run.attention_mask, position_embeddings=run.position_embeddings, position_ids=run.position_ids)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _cut(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any], keep: list[int], counts: list[int]) -> torch.Tensor:
        """Cut at ``layer``: sample b keeps ``keep[b]`` of its ``counts[b]`` visual tokens; the batch stays rectangular.

        The batch keeps its longest sample's live tokens; every other sample fills up
        with its other columns (padding first, then dead and removed tokens in sequence
        order), which are then *dead*: masked out of attention at every later layer and
        decode step.
        """
        run = self.current
        n = hidden.shape[1]
        embeddings = run.position_embeddings if run.cut else kwargs["position_embeddings"]
        mask = run.attention_mask if run.cut else kwargs.get("attention_mask")
        site = CutSite(
            layer=layer, hidden=hidden, columns=run.columns, visual=run.visual, text=run.text, query=run.query, keep=keep[0],
            observed=run.observed, final_norm=self.decoder.norm,
            row_probe=functools.cache(lambda: _row_probe(self.layers[layer], hidden, run.query, embeddings, mask)),
        )
        survivors, plans = self._select(site, keep, counts)
        survivors &= run.visual | run.text
        count = survivors.sum(dim=1, keepdim=True)
        dropped = ~survivors
        width = self.sequence_per_layer[layer]  # the longest sample's live tokens (layer_schedule), read without a sync
        padding = run.mask2d.gather(1, run.columns) == 0 if run.mask2d is not None else torch.zeros_like(dropped)
        position = torch.arange(n, device=hidden.device)
        rank = torch.where(dropped, position + n * ~padding, 2 * n).argsort(dim=1).argsort(dim=1)
        kept = true_indices(survivors | (dropped & (rank < width - count)), width)
        cut = _cut_hidden(hidden, kept, plans)
        run.query = output_index(kept, n).gather(1, run.query[:, None])[:, 0]
        run.dead = dropped.gather(1, kept)
        run.columns, run.visual = run.columns.gather(1, kept), run.visual.gather(1, kept) & ~run.dead
        run.settle()
        shift = self._positions(cut, kwargs)
        run.attention_mask = self._mask(layer, cut, run.attended, kwargs.get("past_key_values"))
        run.cut = True
        run.stages.append(Stage(layer, width, run.attended, shift))
        self.kept[layer] = (run.columns, run.visual)
        return cut

    def _positions(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Set the run's position ids and (cos, sin) for the tokens a cut left (``run.columns``); return the stage's shift.

        "original" gathers the model's full-length ids and (cos, sin) at the survivors'
        columns (convention 0.5.5). "compact" moves each survivor back by the real
        tokens removed before it (:func:`compact_ids`), as the references that build a
        shorter sequence do (METHODS.md C2 step 4, C5.5), and computes (cos, sin) for
        those ids with the decoder's own ``rotary_emb``; the shift is the real tokens each
        sample lost, by which this stage's decode positions move back (None: "original").
        """
        run = self.current
        ids = _gather_ids(kwargs["position_ids"], run.columns)
        if not self.compact:
            run.position_embeddings = tuple(_gather_embedding(t, run.columns) for t in kwargs["position_embeddings"])
            run.position_ids = ids
            return None
        live = run.attended.bool() if run.attended is not None else torch.ones_like(run.visual)
        run.position_ids, shift = compact_ids(ids, run.columns, live, run.input_real)
        run.position_embeddings = self.decoder.rotary_emb(hidden, run.position_ids)
        return shift

    def _select(self, site: CutSite, keep: list[int], counts: list[int]) -> tuple[torch.Tensor, list[tuple[slice, TokenPlan]]]:
        """The method's cut as [B, N] bool survivors (non-visual tokens and kept visual ones), with the plans that merge.

        Methods score rectangular blocks of visual tokens, so a batch whose samples
        have different visual counts or cuts is scored (:meth:`observer`) and cut sample by
        sample, each on its own slice of the batch, as decisions are per sample anyway
        (convention 0.5.7); a sample that removes nothing here is not asked.
        """
        if not self.current.ragged:
            survivor, plan = _survivors(self._timed_select(site), site.visual, keep[0])
            return survivor, [] if plan is None else [(slice(None), plan)]
        rows, plans = [], []
        for b, (k, n) in enumerate(zip(keep, counts)):
            if k == n:
                rows.append(torch.ones_like(site.visual[b : b + 1]))
                continue
            mine = _sample(site, b, keep=k, observed={layer: seen[b] for layer, seen in site.observed.items()},
                           row_probe=lambda probe=site.row_probe, b=b: tuple(_row(t, b) for t in probe()))
            survivor, plan = _survivors(self._timed_select(mine), mine.visual, k)
            rows.append(survivor)
            if plan is not None:
                plans.append((slice(b, b + 1), plan))
        return torch.cat(rows), plans

    def _timed_select(self, site: CutSite) -> torch.Tensor | TokenPlan:
        """The method's selection, inside the profiler range that benchmarks count as the method's own overhead."""
        with torch.profiler.record_function(OVERHEAD_LABEL):
            return self.method.select(site)

    def _follow(self, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        run, prefill = self.current, self.prefill
        stage = prefill.stage_at[layer]
        if stage is None:
            return None
        if stage.first == layer:
            mask2d = None
            if run.mask2d is not None or stage.attended is not None:
                batch, new = hidden.shape[:2]
                ones = functools.partial(torch.ones, dtype=torch.long, device=hidden.device)
                tail = run.mask2d[:, prefill.length : run.past + new] if run.mask2d is not None else ones(batch, run.past + new - prefill.length)
                prefix = stage.attended if stage.attended is not None else ones(batch, stage.width)
                mask2d = torch.cat([prefix.to(tail.dtype), tail], dim=1)
            run.attention_mask = self._mask(layer, hidden, mask2d, kwargs.get("past_key_values"))
            if stage.shift is not None:
                run.position_ids = kwargs["position_ids"] - stage.shift[:, None]
                run.position_embeddings = self.decoder.rotary_emb(hidden, run.position_ids)
        kwargs["attention_mask"] = run.attention_mask
        if stage.shift is not None:
            kwargs.update(position_embeddings=run.position_embeddings, position_ids=run.position_ids)
        return args, kwargs

    def _mask(self, layer: int, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any) -> Any:
        """The causal mask of ``layer``, sized by that layer's own cache length (None where SDPA's is_causal serves).

        Position ids are not passed: the survivors' gaps would read as packed sequences.
        """
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  past_key_values=cache, position_ids=None, layer_idx=layer)

    def observer(self, layer: int) -> Any:
        """The callback ``probe_attention`` runs for layer ``layer`` during a cut prefill (per sample in a ragged batch).

        The layer's RoPE is the (cos, sin) its attention module received (:meth:`keep_rope`),
        whatever the model computes them from (M-RoPE sections included).
        """

        def observe(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> None:
            run = self.current
            if run is None or run.decode:
                return
            attention = LayerAttention(
                query=query, key=key, mask=attention_mask, scale=scale, visual=run.visual, text=run.text, last=run.query,
                columns=run.columns, inputs=run.inputs, input_visual=run.input_visual,
                input_text=run.input_text,
                rope=run.rope[layer], rope_function=functools.partial(_apply_rope, self.layers[layer].self_attn),
            )
            with torch.profiler.record_function(OVERHEAD_LABEL):
                if run.ragged:
                    run.observed[layer] = [self.method.observe_attention(layer, _sample(attention, b)) for b in range(query.shape[0])]
                else:
                    run.observed[layer] = self.method.observe_attention(layer, attention)

        return observe

    def keep_rope(self, layer: int, kwargs: dict[str, Any]) -> None:
        """Attention pre-hook of an observed layer: remember the (cos, sin) it applies, for ``LayerAttention.rope``."""
        if self.current is not None and not self.current.decode:
            self.current.rope[layer] = kwargs["position_embeddings"]

    def end(self, output: Any) -> None:
        """Decoder forward hook: remember a cut prefill's stages so later decode steps on its cache follow them."""
        run, self.current = self.current, None
        cache = getattr(output, "past_key_values", None)
        self.kv_cache_bytes = _cache_bytes(cache)
        if cache is not None and run is not None and run.cut:
            stage_at: list[Stage | None] = [None] * len(self.layers)
            for stage in run.stages:
                stage_at[stage.first :] = [stage] * (len(self.layers) - stage.first)
            self.prefill = Prefill(weakref.ref(cache), run.length, run.stages, stage_at)


def _row(value: Any, b: int) -> Any:
    """Sample ``b`` of a batch-first tensor (or a tuple of them); a tensor broadcast over the batch ([1, ...]) and anything else pass through."""
    if isinstance(value, tuple):
        return tuple(_row(item, b) for item in value)
    return value[b : b + 1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > 1 else value


def _sample(batch: Any, b: int, **fields: Any) -> Any:
    """Sample ``b`` of a frozen dataclass of batch-first tensors (:class:`CutSite`, :class:`LayerAttention`), ``fields`` replaced."""
    rows = {f.name: _row(getattr(batch, f.name), b) for f in dataclasses.fields(batch) if f.name not in fields}
    return dataclasses.replace(batch, **rows, **fields)


def _survivors(choice: torch.Tensor | TokenPlan, visual: torch.Tensor, keep: int) -> tuple[torch.Tensor, TokenPlan | None]:
    """A method's choice (kept visual indices, or a plan) as [B, N] bool survivors, and the plan if it merges."""
    if isinstance(choice, TokenPlan):
        _check_plan(choice, visual, visual.shape[1] - int(visual[0].sum()) + keep)
        return torch.zeros_like(visual).scatter(1, choice.keep, True), choice
    return (~visual).scatter(1, choice, True), None


def _cut_hidden(hidden: torch.Tensor, kept: torch.Tensor, plans: list[tuple[slice, TokenPlan]]) -> torch.Tensor:
    """Hidden states [B, N, C] at the [B, K] ``kept`` columns, merged where a sample's cut returned a plan.

    Each row is computed once: a plan covering the batch is the whole result, and
    otherwise only the rows without a plan are gathered (a merge reads the full
    hidden states, so gathering its rows first would be thrown away).
    """
    n = hidden.shape[1]
    if len(plans) == 1 and plans[0][0] == slice(None):
        return apply_plan(_widen(plans[0][1], kept, n), hidden)[0]
    if not plans:
        return gather_tokens(hidden, kept)
    cut = hidden.new_empty(*kept.shape, hidden.shape[2])
    planned = {rows.start for rows, _ in plans}
    plain = [b for b in range(kept.shape[0]) if b not in planned]
    if plain:
        cut[plain] = gather_tokens(hidden[plain], kept[plain])
    for rows, plan in plans:
        cut[rows] = apply_plan(_widen(plan, kept[rows], n), hidden[rows])[0]
    return cut


def _widen(plan: TokenPlan, keep: torch.Tensor, n: int) -> TokenPlan:
    """``plan`` with ``keep`` ([B, K'] ascending) as kept tokens, merges retargeted.

    ``keep`` holds the plan's kept live tokens, which its merges fold into, and
    fillers; padding or dead columns the plan keeps may be gone from it.
    """
    if plan.merge_dst is None:
        return dataclasses.replace(plan, keep=keep)
    moved = output_index(keep, n).gather(1, plan.keep)  # new output of each old output
    dst = moved.gather(1, plan.merge_dst.flatten(1)).view_as(plan.merge_dst)
    return dataclasses.replace(plan, keep=keep, merge_dst=dst)


def _gather_embedding(t: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """cos or sin [..., 1 or B, N, d] at [B, K] columns -> [..., B, K, d], on the token axis.

    Leading dims are kept because some RoPE variants hand the layers one table per
    position row (M-RoPE as [3, B, N, d], combined inside the attention).
    """
    lead = t.shape[:-3]
    t = t.expand(*lead, columns.shape[0], *t.shape[-2:])
    return t.gather(-2, columns[..., None].expand(*lead, -1, -1, t.shape[-1]))


def compact_ids(ids: torch.Tensor, columns: torch.Tensor, live: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous position ids after a cut: each token's id less the real tokens removed before it, and [B] removed in all.

    ids: [B, N] the tokens' original position ids; columns: [B, N] their original
    columns; live: [B, N] bool, the tokens still attended (not padding, not dead);
    real: [B, L] bool, the prompt's unpadded columns. Where the original ids number
    each sample's real tokens 0..L-1 (``generate``'s ``cumsum(mask) - 1``, or the
    column index without padding) the live tokens get 0..L'-1: the sequence the
    references build (METHODS.md C2 step 4, C5.5). Padding and dead columns get
    ids too, which no live token attends.
    """
    kept = torch.zeros_like(real).scatter(1, columns, live)
    removed = (real & ~kept).cumsum(dim=1)
    return ids - removed.gather(1, columns), removed[:, -1]


def _gather_ids(t: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
    """Position ids [1 or B, N] (or M-RoPE [3, 1 or B, N]) at [B, K] columns, on the token axis.

    None stays None: decoders whose layers get their positions only through the
    embeddings (Qwen-VL passes ids to its layers only for packed sequences).
    """
    if t is None:
        return None
    lead = t.shape[:-2]
    return t.expand(*lead, *columns.shape[:1], t.shape[-1]).gather(-1, columns.expand(*lead, -1, -1))


def _apply_rope(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerAttention.rope_function``: the attention module's own ``apply_rotary_pos_emb``.

    No rotation layout is assumed outside the model's code; the function is looked up
    only when a method rotates, so models whose module names it otherwise still run
    the methods that do not.
    """
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb(query, key, cos, sin)


def _row_probe(layer: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor],
               attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Probe P2 at a Llama-family layer's input: input norm -> q (one row per sample) / k projections -> RoPE."""
    attention = layer.self_attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    batch, n = hidden.shape[:2]
    head_dim = attention.head_dim
    normed = layer.input_layernorm(hidden)
    picked = gather_tokens(normed, rows[:, None])
    query = attention.q_proj(picked).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, n, -1, head_dim).transpose(1, 2)
    cos, sin = embeddings
    query, _ = rope(query, query, _gather_embedding(cos, rows[:, None]), _gather_embedding(sin, rows[:, None]))
    _, key = rope(key, key, cos, sin)
    return query, key, visible_keys(attention_mask, rows, n, n), attention.scaling


def _check_plan(plan: TokenPlan, visual: torch.Tensor, count: int) -> None:
    """A cut's plan keeps every non-visual token and the scheduled visual ones, and appends nothing."""
    kept_text = (~visual).gather(1, plan.keep).sum(dim=1)
    if plan.new_tokens or plan.keep.shape[1] != count or bool((kept_text != (~visual).sum(dim=1)).any()):
        raise RuntimeError(
            f"tokenreduce: a cut's TokenPlan must keep all {int((~visual[0]).sum())} non-visual tokens plus the scheduled "
            f"visual ones ({count} in all) and append none; got {plan.keep.shape[1]} kept and {plan.new_tokens} appended"
        )


def _check_cache(cache: Any) -> None:
    """Cut layers hold shorter caches than the layers before them: only a cache that grows per layer can follow."""
    from transformers.cache_utils import DynamicCache

    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"tokenreduce: in-LLM reduction needs a DynamicCache (per-layer lengths), got {type(cache).__name__}; "
            "use generate()'s default cache or pass use_cache=False"
        )


def _cache_bytes(cache: Any) -> int | None:
    """Bytes held by a cache's keys and values over all layers (None without a cache)."""
    if cache is None:
        return None
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values) if t is not None)


def _check_full_attention(config: Any) -> None:
    """Every layer must attend causally over the whole sequence: the masks of cut layers are built as full causal masks."""
    windowed = sorted({kind for kind in getattr(config, "layer_types", None) or () if kind != "full_attention"})
    if windowed:
        raise UnsupportedModelError(
            f"in-LLM reduction builds full causal masks for the layers after a cut, but this language model has "
            f"{', '.join(map(repr, windowed))} layers (layer_types); load it without sliding-window attention"
        )


def attach_decoder(decoder: nn.Module, method: DecoderMethod) -> tuple[list[Undo], DecoderRun]:
    """Install ``method`` on a Llama-family decoder model; return the undo actions and the run state."""
    config = decoder.config
    if config._attn_implementation != "sdpa":
        raise UnsupportedModelError(
            f"in-LLM reduction keeps the language model on SDPA and adds its probe to it, but this one runs "
            f"{config._attn_implementation!r}; load the model with attn_implementation='sdpa'"
        )
    _check_full_attention(config)
    _register_probe_attention()
    layers = list(decoder.layers)
    run = DecoderRun(method=method, decoder=decoder, layers=layers, compact=method.config.positions == "compact")
    undo: list[Undo] = []
    config._attn_implementation = PROBE_ATTENTION
    undo.append(lambda: setattr(config, "_attn_implementation", "sdpa"))
    for layer in method.observe_layers():
        attention = layers[layer].self_attn
        _OBSERVERS[attention] = run.observer(layer)
        undo.append(lambda a=attention: _OBSERVERS.pop(a, None))
        rope = attention.register_forward_pre_hook(lambda _m, _a, kw, i=layer: run.keep_rope(i, kw), with_kwargs=True)
        undo.append(rope.remove)
    handles = [decoder.register_forward_pre_hook(lambda _m, a, kw: run.begin(a, kw), with_kwargs=True),
               decoder.register_forward_hook(lambda _m, _a, out: run.end(out))]
    first = min(method.cut_layers())
    for index in range(first, len(layers)):
        handles.append(layers[index].register_forward_pre_hook(lambda _m, a, kw, i=index: run.enter(i, a, kw), with_kwargs=True))
    undo.extend(h.remove for h in handles)
    return undo, run
