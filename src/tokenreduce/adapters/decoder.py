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
  hidden states entering K are gathered. Text and padding always survive, so
  every sample keeps the same count and the batch stays rectangular.
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
  columns, decode columns) and a mask is rebuilt for the first layer of every
  stage from that layer's cache length (convention 0.5.6). Each layer runs once
  per forward; nothing is re-run to obtain scores.
* The decoder's output covers the survivors only, so a prefill's logits are
  shorter than the prompt (as in FastV's inplace mode); ``stats()`` reports the
  sequence length at every layer, and from it the prefill FLOPs
  (:class:`~tokenreduce.methods.inllm.DecoderShape`, whose dimensions
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

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import OVERHEAD_LABEL
from ..methods.inllm import CutSite, DecoderMethod, DecoderShape, LayerAttention, visible_keys, visual_per_layer
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
    """The dimensions of a Llama-family decoder from its (text) config, for ``facts["decoder"]`` (FLOPs budgets and stats)."""
    heads = config.num_attention_heads
    return DecoderShape(
        hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, layers=config.num_hidden_layers,
    )


def last_real_token(mask2d: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B] index of each sample's last unpadded token (left or right padding)."""
    if mask2d is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    return last_true(mask2d.bool())


@dataclass
class Prefill:
    """A cut prompt, so that decode steps on the same cache can follow it."""

    cache: Any  # weakref to the KV cache the cut prefill filled
    length: int  # prompt length before any cut
    stages: list[tuple[int, torch.Tensor]]  # (first layer, [B, n] original columns kept from that layer on)


@dataclass
class Pass:
    """One forward of the decoder in progress (prefill being cut, or a decode step on a cut cache)."""

    decode: bool
    mask2d: torch.Tensor | None  # [B, L] the model's 2-D padding mask (full length)
    columns: torch.Tensor | None = None  # [B, N] original column of each current token (prefill)
    visual: torch.Tensor | None = None  # [B, N] bool
    query: torch.Tensor | None = None  # [B] last real token, current index
    cuts: dict[int, int] = field(default_factory=dict)
    attention_mask: Any = None  # the mask of the current stage
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    cut: bool = False
    observed: dict[int, Any] = field(default_factory=dict)
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (cos, sin) each observed layer applied
    stages: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    past: int = 0  # decode: tokens in layer 0's cache before this step
    length: int = 0  # prefill: prompt length before any cut
    inputs: torch.Tensor | None = None  # prefill: [B, L, C] the decoder's input embeddings
    input_visual: torch.Tensor | None = None  # prefill: [B, L] bool, visual tokens of the prompt

    def text(self) -> torch.Tensor:
        """[B, N] bool: the current real (unpadded) non-visual tokens."""
        real = self.mask2d.gather(1, self.columns).bool() if self.mask2d is not None else torch.ones_like(self.visual)
        return real & ~self.visual


@dataclass
class DecoderRun:
    """Run state of an in-LLM method: the forward in progress, the last cut prefill, and what it did."""

    method: DecoderMethod
    decoder: nn.Module
    layers: list[nn.Module]
    pending_visual: torch.Tensor | None = None
    current: Pass | None = None
    prefill: Prefill | None = None
    prefills: int = 0
    batch: int = 0  # samples in the last prefill
    images: int = 0
    visual_in: int = 0
    visual_per_layer: list[int] = field(default_factory=list)
    sequence_per_layer: list[int] = field(default_factory=list)
    kept: dict[int, list[list[int]]] = field(default_factory=dict)
    kv_cache_bytes: int | None = None  # held by the cache after the last forward (None without a cache)

    def expect_visual(self, visual: torch.Tensor | None) -> None:
        """The adapter's report for the next decoder forward: [B, N] bool visual tokens (None: unknown, no cut)."""
        self.pending_visual = visual

    def stats(self) -> dict[str, Any]:
        """What the last prefill did: visual tokens and sequence length per layer, T_eq (METHODS.md sec. E4), cache, FLOPs.

        ``prefill_flops`` / ``prefill_flops_full`` are that prefill's decoder FLOPs for
        the whole batch with and without the reduction, in the scope
        :class:`DecoderShape` documents (decoder layers' matrix products at each
        layer's length; no LM head, no scoring), ``prefill_flops_ratio`` their
        quotient; all None before a prefill or without ``facts["decoder"]``.
        """
        layers = len(self.layers)
        visual = self.visual_per_layer or [self.visual_in] * layers
        stats: dict[str, Any] = {
            "images": self.images,
            "visual_tokens_in": self.visual_in,
            "visual_tokens_out": [visual[-1]] * self.images,
            "visual_tokens_per_layer": list(visual),
            "sequence_per_layer": list(self.sequence_per_layer),
            "equivalent_tokens": sum(visual) / layers,
            "kv_cache_bytes": self.kv_cache_bytes,
            **self._flops(),
            "kept": {layer: [list(row) for row in rows] for layer, rows in self.kept.items()},
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
        self.visual_per_layer, self.sequence_per_layer, self.kept = [], [], {}

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
        batch = visual.shape[0] if visual is not None else 1
        self.images, self.visual_in = 0, 0
        self.visual_per_layer, self.sequence_per_layer = [], [length] * len(self.layers)
        if not has_image:
            return
        _check_cache(cache)
        counts = visual.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"tokenreduce: in-LLM reduction keeps the batch rectangular and needs the same number of visual tokens "
                f"in every sample, got {counts.tolist()}; batch prompts with the same images count together"
            )
        n = int(counts[0])
        cuts = self.method.cuts(n, length)
        self.images, self.visual_in = batch, n
        self._record_schedule(n, length, cuts)
        if all(keep >= n for _, keep in cuts):
            return
        device = visual.device
        inputs = embeds if embeds is not None else self.decoder.get_input_embeddings()(kwargs.get("input_ids", args[0] if args else None))
        self.current = Pass(
            decode=False, mask2d=mask2d, visual=visual,
            columns=torch.arange(length, device=device).expand(batch, length),
            query=last_real_token(mask2d, batch, length, device), cuts=dict(cuts), length=length,
            inputs=inputs, input_visual=visual,
        )

    def _record_schedule(self, n: int, length: int, cuts: list[tuple[int, int]]) -> None:
        visual = visual_per_layer(n, cuts, len(self.layers))
        self.visual_per_layer = visual
        self.sequence_per_layer = [length - (n - v) for v in visual]

    def enter(self, layer: int, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Decoder-layer pre-hook: cut at a cut layer, then hand every later layer the sliced inputs."""
        run = self.current
        if run is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if run.decode:
            return self._follow(layer, hidden, args, kwargs)
        if layer in run.cuts and run.cuts[layer] < int(run.visual[0].sum()):
            hidden = self._cut(layer, hidden, kwargs)
        if not run.cut:
            return None
        kwargs.update(attention_mask=run.attention_mask, position_embeddings=run.position_embeddings, position_ids=run.position_ids)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _cut(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        run = self.current
        batch, n = hidden.shape[:2]
        full_embeddings = kwargs["position_embeddings"]
        embeddings = run.position_embeddings if run.cut else full_embeddings
        mask = run.attention_mask if run.cut else kwargs.get("attention_mask")
        site = CutSite(
            layer=layer, hidden=hidden, columns=run.columns, visual=run.visual, text=run.text(), query=run.query, keep=run.cuts[layer],
            observed=run.observed, final_norm=self.decoder.norm,
            row_probe=lambda: _row_probe(self.layers[layer], hidden, run.query, embeddings, mask),
        )
        count = n - int(run.visual[0].sum()) + run.cuts[layer]
        with torch.profiler.record_function(OVERHEAD_LABEL):
            choice = self.method.select(site)
        if isinstance(choice, TokenPlan):
            keep = choice.keep
            _check_plan(choice, run.visual, count)
        else:
            keep = true_indices((~run.visual).scatter(1, choice, True), count)
        run.query = output_index(keep, n).gather(1, run.query[:, None])[:, 0]
        run.columns, run.visual = run.columns.gather(1, keep), run.visual.gather(1, keep)
        run.position_embeddings = tuple(_gather_embedding(t, run.columns) for t in full_embeddings)
        run.position_ids = _gather_ids(kwargs["position_ids"], run.columns)
        hidden = apply_plan(choice, hidden)[0] if isinstance(choice, TokenPlan) else gather_tokens(hidden, keep)
        cache = kwargs.get("past_key_values")
        run.attention_mask = self._mask(layer, hidden, run.mask2d.gather(1, run.columns) if run.mask2d is not None else None, cache)
        run.cut = True
        run.stages.append((layer, run.columns))
        self.kept[layer] = run.columns.masked_select(run.visual).view(batch, -1).tolist()
        return hidden

    def _follow(self, layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        run, prefill = self.current, self.prefill
        starts = [columns for first, columns in prefill.stages if first <= layer]
        if not starts:
            return None
        if any(first == layer for first, _ in prefill.stages):
            total = run.past + hidden.shape[1]
            mask2d = None
            if run.mask2d is not None:
                tail = torch.arange(prefill.length, total, device=hidden.device).expand(hidden.shape[0], -1)
                mask2d = run.mask2d.gather(1, torch.cat([starts[-1], tail], dim=1))
            run.attention_mask = self._mask(layer, hidden, mask2d, kwargs.get("past_key_values"))
        kwargs["attention_mask"] = run.attention_mask
        return args, kwargs

    def _mask(self, layer: int, hidden: torch.Tensor, mask2d: torch.Tensor | None, cache: Any) -> Any:
        """The causal mask of ``layer``, sized by that layer's own cache length (None where SDPA's is_causal serves).

        Position ids are not passed: the survivors' gaps would read as packed sequences.
        """
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  past_key_values=cache, position_ids=None, layer_idx=layer)

    def observer(self, layer: int) -> Any:
        """The callback ``probe_attention`` runs for layer ``layer`` during a cut prefill.

        The layer's RoPE is the (cos, sin) its attention module received (:meth:`keep_rope`),
        whatever the model computes them from (M-RoPE sections included).
        """

        def observe(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> None:
            run = self.current
            if run is None or run.decode:
                return
            attention = LayerAttention(
                query=query, key=key, mask=attention_mask, scale=scale, visual=run.visual, text=run.text(), last=run.query,
                columns=run.columns, inputs=run.inputs, input_visual=run.input_visual,
                input_text=(run.mask2d.bool() if run.mask2d is not None else torch.ones_like(run.input_visual)) & ~run.input_visual,
                rope=lambda: run.rope[layer],
            )
            with torch.profiler.record_function(OVERHEAD_LABEL):
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
            self.prefill = Prefill(weakref.ref(cache), run.length, run.stages)


def _gather_embedding(t: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """cos or sin [..., 1 or B, N, d] at [B, K] columns -> [..., B, K, d], on the token axis.

    Leading dims are kept because some RoPE variants hand the layers one table per
    position row (M-RoPE as [3, B, N, d], combined inside the attention).
    """
    lead = t.shape[:-3]
    t = t.expand(*lead, columns.shape[0], *t.shape[-2:])
    return t.gather(-2, columns[..., None].expand(*lead, -1, -1, t.shape[-1]))


def _gather_ids(t: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor | None:
    """Position ids [1 or B, N] (or M-RoPE [3, 1 or B, N]) at [B, K] columns, on the token axis.

    None stays None: decoders whose layers get their positions only through the
    embeddings (Qwen-VL passes ids to its layers only for packed sequences).
    """
    if t is None:
        return None
    lead = t.shape[:-2]
    return t.expand(*lead, *columns.shape[:1], t.shape[-1]).gather(-1, columns.expand(*lead, -1, -1))


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
    run = DecoderRun(method=method, decoder=decoder, layers=layers)
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
