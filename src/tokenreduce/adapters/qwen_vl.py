"""Qwen2-VL and Qwen2.5-VL (``*ForConditionalGeneration`` / ``*Model``): fewer visual tokens reach the LLM.

Two sites. ``llm`` (H4/H5): cuts inside the language model (FastV, PyramidDrop, DART,
SparseVLM, FiCoCo-L), run by the decoder machinery of :mod:`.decoder` on the text model
(see "In the LLM" below). ``merger_output`` (H3): the tokens of one image after the 2x2 ``PatchMerger``,
which is the projector of these models, with their grid (h/2, w/2 from
``image_grid_thw``). Reducing earlier would break the merger, which assumes four
spatial neighbours per group (METHODS.md B1 pitfalls, VisionZip-Qwen2VL issue #3).
Images of different sizes in one batch have different token counts, so each image
is reduced on its own, and the budget is checked per image when it arrives.

Scores. The tower has no [CLS]; methods that rank tokens by importance (FasterVLM,
VisPruner) get "attention received" (probe P4, chunked, ``ops.scoring``) at the last
full-attention block, averaged over each 2x2 merge group (as LightCompress and VScan
do, METHODS.md B1 / H5 VScan). Qwen2.5-VL attends in windows in most blocks and keeps
its patches in window order inside the tower; the probe uses a block listed in
``fullatt_block_indexes`` and maps the group scores back to raster order with the
model's own window index. q and k are the block's own (qkv output, the model's
vision RoPE applied); the block itself keeps running SDPA.

Methods. FasterVLM and VisPruner rank by the score above, METHODS.md's stand-in for
[CLS] attention on [CLS]-free encoders (B1); DivPrune and the random / uniform /
pooling baselines need no attention (P0) and see the merged grid. Refused with
:class:`UnsupportedModelError` (no ``merger_output`` site): VisionZip (its contextual
tokens are merged by the feature layer's per-token keys, which merged tokens lack)
and the in-tower methods ToMe / EViT / FiCoCo-V (they act before the merger).

Sequence. :class:`MRopeShrinker` reuses LLaVA's :class:`PlaceholderShrinker` and
differs where Qwen differs: placeholder runs have one length per image (from
``image_grid_thw``); a kept token keeps the placeholder column of its original
merged index (a pooling cell: its top-left token's; a created token without a
location: the first free column), and the 3-row M-RoPE position ids are the stock model's ids for the full
prompt (its own ``compute_3d_position_ids`` / generate's ids), gathered at the kept
columns (DESIGN.md sec. 4.3). So kept tokens keep their (t, h, w) positions and text
after the image keeps its positions; decode steps keep generate's position ids, which
continue the original sequence, or (without them) text position + the stock
``rope_deltas``.

In the LLM. The text model's decoder layers have the Llama-family interface, and the
model has already folded M-RoPE into them: the text model turns the 3-row (t, h, w) ids
into one (cos, sin) table [B, N, d] (each frequency band read from its row,
``mrope_section``) and the attention applies its module's plain
``apply_rotary_pos_emb``, which is what the decoder machinery's probe P2 uses. So cutting
gathers that table at the survivors' columns and a kept token keeps its (t, h, w)
position without the machinery knowing about M-RoPE; the layers get ids only for
packed sequences (generate's text row), gathered the same way. Layers before the first
cut keep the full prompt in the cache, so the model's decode positions (cache length of
layer 0, or generate's ids, plus the stock ``rope_deltas``) continue the original
sequence untouched. Image and video placeholders are visual tokens alike: both are
vision-tower tokens the in-LLM methods score the same way (FastV and SparseVLM report
video models too), and a prompt's visual count is only known at its prefill
(``reducible_tokens`` None), where a budget it cannot meet raises ``ConfigError``.

Positions: ``"original"`` only, at both sites (the base ``Adapter.position_modes``):
M-RoPE's (t, h, w) ids have no contiguous re-indexing, so ``apply`` refuses
``positions="compact"`` with a ``ConfigError`` before touching the model.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import QKCapture, TowerRun, replace_forward
from ..ops.scoring import attention_received
from ..registry import lookup_by_class, register_adapter
from .base import Adapter, Undo
from .decoder import DecoderRun, decoder_shape
from .llava import PlaceholderShrinker, VlmRun, attach_language_model, runs_per_sample

_HF = "transformers.models"


@dataclass(frozen=True)
class QwenVisionSpec:
    """What differs between the Qwen vision towers: which blocks attend over the whole image."""

    full_attention_blocks: str | None  # attribute of the tower listing them; None: every block
    window_order: bool  # patches are kept in window order inside the tower (merger output reordered after)


QWEN2 = QwenVisionSpec(full_attention_blocks=None, window_order=False)
QWEN2_5 = QwenVisionSpec(full_attention_blocks="fullatt_block_indexes", window_order=True)
FAMILIES: dict[str, QwenVisionSpec] = {
    f"{_HF}.qwen2_vl.modeling_qwen2_vl.Qwen2VLModel": QWEN2,
    f"{_HF}.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLModel": QWEN2_5,
}
MODEL_CLASSES = (
    *FAMILIES,
    f"{_HF}.qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration",
    f"{_HF}.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
)


def _spec_for(inner: nn.Module) -> QwenVisionSpec:
    spec = lookup_by_class(FAMILIES, inner)
    if spec is not None:
        return spec
    raise UnsupportedModelError(f"no Qwen-VL vision layout for {type(inner).__name__}")


@dataclass
class QwenVlRun(VlmRun):
    """Run state: LLaVA's, with one placeholder count per image and the kept slot of each token."""

    # Set by the reducing get_image_features (generate encodes images before the forward and drops image_grid_thw):
    placeholders_per_image: list[int] = field(default_factory=list)  # type: ignore[assignment]  # merged tokens per image
    slots: list[torch.Tensor] = field(default_factory=list)  # per image [K] placeholder slot of each kept token

    def reset(self) -> None:
        super().reset()
        self.slots = []

    def surviving_patches(self) -> None:
        """No single [B, P] grid: images differ in size. ``slots`` holds each image's kept merged-token indices."""
        return None


class MergeGroupProbe:
    """Attention received by each merged token: P4 at one full-attention block, mean over each merge group.

    Reads the block's ``qkv`` output and the ``cu_seqlens`` / rotary embeddings it was
    called with, so the model's attention itself is untouched.
    """

    def __init__(self, visual: nn.Module, block: int, spec: QwenVisionSpec) -> None:
        self.visual = visual
        self.attn = visual.blocks[block].attn
        self.spec = spec
        self.modeling = importlib.import_module(type(visual).__module__)  # the tower's own RoPE and window helpers
        self.unit = visual.spatial_merge_size**2
        self.qkv: torch.Tensor | None = None
        self.call: dict[str, Any] = {}
        self.armed = False  # record image encodings only (videos pass the same block)

    def install(self) -> list[Undo]:
        """Hook the probe block; returns the undo actions."""

        def keep_qkv(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if self.armed:
                self.qkv = output

        def keep_call(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
            if self.armed:
                self.call = kwargs

        return [
            self.attn.qkv.register_forward_hook(keep_qkv).remove,
            self.attn.register_forward_pre_hook(keep_call, with_kwargs=True).remove,
        ]

    def take(self, grid_thw: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
        """The recorded encoding's scores, computed on first call: per image [G] in raster order (the LLM's token order)."""
        qkv, call = self.qkv, self.call
        self.qkv, self.call = None, {}
        return functools.cache(lambda: self._scores(qkv, call, grid_thw))

    def _scores(self, qkv: torch.Tensor, call: dict[str, Any], grid_thw: torch.Tensor) -> list[torch.Tensor]:
        length = qkv.shape[0]
        q, k, _ = qkv.reshape(length, 3, self.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # VisionAttention's layout
        q, k = self.modeling.apply_rotary_pos_emb_vision(q, k, *call["position_embeddings"])
        q, k = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)  # [1, H, S, d]
        bounds = call["cu_seqlens"].tolist()
        received = torch.cat([attention_received(q[:, :, a:b], k[:, :, a:b], self.attn.scaling)[0] for a, b in zip(bounds, bounds[1:])])
        groups = received.view(-1, self.unit).mean(dim=-1)
        if self.spec.window_order:
            window_index, _ = self.modeling.get_vision_window_index(
                grid_thw, spatial_merge_size=self.visual.spatial_merge_size, window_size=self.visual.window_size,
                patch_size=self.visual.patch_size,
            )
            groups = groups[torch.argsort(window_index.to(groups.device))]
        return list(groups.split((grid_thw.prod(-1) // self.unit).tolist()))


class MRopeShrinker(PlaceholderShrinker):
    """LLaVA's placeholder shrinking with per-image run lengths and gathered 3-row M-RoPE position ids."""

    run: QwenVlRun

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        prefill = self.run.prefill
        if prefill is not None and prefill.cache is None and getattr(out, "past_key_values", None) is not None:
            prefill.cache = weakref.ref(out.past_key_values)  # the model made the cache: follow decode steps on it too
        return out

    def _image_features(self, kwargs: dict[str, Any]) -> Any:
        return self.inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"), return_dict=True)

    def _shorten_prefill(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        kept = [f.shape[0] for f in features]
        ids, cache = self._prefill_inputs(kwargs)
        run = self.run
        if [len(s) for s in run.slots] != kept:
            raise ValueError("tokenreduce: image features must come from this model's get_image_features while the method is applied")
        placeholders = run.placeholders_per_image
        is_image = ids == self.image_token_id
        per_sample = is_image.sum(dim=1).tolist()
        runs = runs_per_sample(per_sample, placeholders)
        if runs is None:
            raise ValueError(
                f"tokenreduce: {len(placeholders)} image(s) of {placeholders} merged tokens need as many image placeholder "
                f"tokens, image by image, got {per_sample} placeholders per sample"
            )
        run.prefills += 1
        run.images, run.tokens_per_image = len(kept), kept
        run.slots_per_image = [s.tolist() for s in run.slots]
        run.sequence_in = ids.shape[1]
        if kept == placeholders:
            run.sequence_out, run.prefill = [ids.shape[1]] * ids.shape[0], None
            return
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self._full_positions(kwargs)
        mask = kwargs.get("attention_mask")
        keep = ~is_image if mask is None else ~is_image & (mask > 0)  # padding is rebuilt for the shortened batch
        for b, images in enumerate(runs):
            slots = is_image[b].nonzero()[:, 0].split([placeholders[i] for i in images])
            for image, image_slots in zip(images, slots):
                keep[b, image_slots[run.slots[image].to(ids.device)]] = True
        self._gather(kwargs, keep, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), cache)

    def _full_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The stock model's M-RoPE ids of the full prompt (this also sets its ``rope_deltas`` for decoding)."""
        compute = self.inner.compute_3d_position_ids
        wanted = set(inspect.signature(compute).parameters) - {"inputs_embeds"}  # Qwen2.5-VL adds second_per_grid_ts
        positions = compute(inputs_embeds=None, **{name: kwargs.get(name) for name in wanted})
        if positions is None:
            raise ValueError("tokenreduce: pass mm_token_type_ids (the processor returns it); without it the model has no M-RoPE positions to keep")
        return positions

    def _gather(self, kwargs: dict[str, Any], keep: torch.Tensor, origin: torch.Tensor, cache: Any) -> None:
        positions = kwargs.pop("position_ids")  # kept columns are the slots of their own merged tokens: origin is the identity
        super()._gather(kwargs, keep, origin, cache)
        columns = self.run.prefill.columns  # [B, W] original column of each kept column, -1 for added padding
        index, filled = columns.clamp_min(0), columns >= 0
        # Only the (t, h, w) rows: a leading text row (generate's 4-row ids) only marks packed sequences.
        rows = positions[-3:] if positions.ndim == 3 else positions.expand(3, -1, -1)
        kwargs["position_ids"] = torch.where(filled, rows.gather(2, index.expand(3, -1, -1)), 0)
        if kwargs.get("mm_token_type_ids") is not None:
            kwargs["mm_token_type_ids"] = torch.where(filled, kwargs["mm_token_type_ids"].gather(1, index), 0)

    def _follow_decode(self, kwargs: dict[str, Any]) -> None:
        positions = kwargs.pop("position_ids", None)
        if positions is None:
            positions = self._decode_positions(kwargs)
        super()._follow_decode(kwargs)
        kwargs["position_ids"] = positions

    def _decode_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Stock decode positions: the token's position in the original text + the stock ``rope_deltas``.

        Counted on the original-length attention mask (before it is shrunk), or from the
        original length when there is no mask.
        """
        prefill = self.run.prefill
        if self.inner.rope_deltas is None:
            raise ValueError("tokenreduce: the prompt was run with explicit position_ids; pass position_ids at each decode step too")
        new = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            text = mask.long().cumsum(-1)[:, -new:] - 1
        else:
            past = prefill.length + kwargs["past_key_values"].get_seq_length() - prefill.columns.shape[1]
            text = torch.arange(past, past + new, device=prefill.columns.device).expand(prefill.columns.shape[0], -1)
        return (text + self.inner.rope_deltas.to(text.device)).expand(3, -1, -1)


def _image_scores(scores: Callable[[], list[torch.Tensor]], image: int) -> torch.Tensor:
    """[1, G] scores of one image from the lazily computed scores of all images of an encoding."""
    return scores()[image].unsqueeze(0)



@register_adapter(*MODEL_CLASSES)
class QwenVLAdapter(Adapter):
    """Visual-token reduction for Qwen2-VL / Qwen2.5-VL after the 2x2 patch merger or inside the language model."""

    sites = frozenset({"merger_output", "llm"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner = model if hasattr(model, "visual") else model.model
        self.spec = _spec_for(self.inner)
        visual = self.inner.visual
        depth = len(visual.blocks)
        full = list(range(depth)) if self.spec.full_attention_blocks is None else list(getattr(visual, self.spec.full_attention_blocks))
        if not full or not 0 <= max(full) < depth:
            raise UnsupportedModelError(f"{type(model).__name__}: no full-attention vision block among {depth} blocks (got {full})")
        self.probe_block = max(full)
        config = self.inner.config
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.pad_token_id = getattr(config.text_config, "pad_token_id", None) or 0
        self.grid: tuple[int, int] = (0, 0)  # merged grid of the image being reduced

    def modules_touched(self) -> list[nn.Module]:
        if self.site == "llm":
            return [self.inner, self.inner.language_model]
        return [self.inner, self.inner.visual, self.inner.visual.blocks[self.probe_block]]

    def describe(self) -> dict[str, Any]:
        facts = {
            "num_layers": len(self.inner.language_model.layers) if self.site == "llm" else 1,
            "default_layer": 0,
            "reducible_tokens": None,  # dynamic resolution: each image's merged count, checked when it arrives
            "protected_tokens": 0,
            "has_cls": False,
            "grid": None,
            "probe_block": self.probe_block,
        }
        if self.site == "llm":
            facts["decoder"] = decoder_shape(self.inner.language_model.config)
        return facts

    def grid_for(self, tokens: int) -> tuple[int, int]:
        if tokens != self.grid[0] * self.grid[1]:
            raise ValueError(f"tokenreduce: {tokens} merged tokens do not fill the image's {self.grid} grid")
        return self.grid

    def attach(self, method: Any) -> tuple[list[Undo], QwenVlRun | DecoderRun]:
        if self.site == "llm":
            return attach_language_model(self.inner, method, self.image_token_id, self.video_token_id)
        vision = TowerRun(protected=0, has_cls=False, grid_for=self.grid_for, method=method)
        run = QwenVlRun(vision=vision)
        probe = MergeGroupProbe(self.inner.visual, self.probe_block, self.spec)
        undo = probe.install()
        undo.append(replace_forward(self.inner, self._reducing_encoder(probe, run), name="get_image_features"))
        shrinker = MRopeShrinker(self.inner, self.image_token_id, self.pad_token_id, 0, run)  # run lengths come per image
        undo.append(replace_forward(self.inner, shrinker))
        return undo, run

    def _reducing_encoder(self, probe: MergeGroupProbe, run: QwenVlRun) -> Callable[..., Any]:
        """The model's ``get_image_features`` followed by one reduction per image.

        Shadowing this method (not the forward) reduces the images wherever they are
        encoded: in the forward, and in ``generate``, which encodes them before the
        prefill and drops ``image_grid_thw``; so each image's placeholder count and
        kept slots are recorded here for the shrinker.
        """
        original = self.inner.get_image_features
        merge = self.inner.visual.spatial_merge_size

        def get_image_features(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any) -> Any:
            if image_grid_thw is None:
                raise ValueError("tokenreduce: Qwen-VL image features need image_grid_thw (the processor returns it)")
            probe.armed = True
            try:
                out = original(pixel_values, image_grid_thw, **{**kwargs, "return_dict": True})
            finally:
                probe.armed = False
            scores = probe.take(image_grid_thw)
            reduced = [self._reduce(tokens, functools.partial(_image_scores, scores, i), (t * h // merge, w // merge), run.vision)
                       for i, (tokens, (t, h, w)) in enumerate(zip(out.pooler_output, image_grid_thw.tolist()))]
            run.placeholders_per_image = [tokens.shape[0] for tokens in out.pooler_output]
            out.pooler_output = tuple(x for x, _ in reduced)
            run.slots = [slots for _, slots in reduced]
            return out if kwargs.get("return_dict", True) else out.to_tuple()

        return get_image_features

    def _reduce(self, tokens: torch.Tensor, scores: Callable[[], torch.Tensor], grid: tuple[int, int], vision: TowerRun) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's merged tokens [G, D] -> (kept tokens [K, D], their placeholder slots [K] ascending).

        A kept token's slot is its original merged index; tokens a method creates
        (pooling cells) have none and take the first free slots.
        """
        self.grid = grid
        x = tokens.unsqueeze(0)
        vision.begin(x)
        x = vision.reduce(0, x, QKCapture(scores=scores), 0.0)[0]
        slots = vision.positions[0].clone()
        created = slots < 0
        if bool(created.any()):
            free = torch.ones(tokens.shape[0], dtype=torch.bool, device=slots.device)
            free[slots[~created]] = False
            slots[created] = free.nonzero()[: int(created.sum()), 0]
        order = slots.argsort()
        return x[order], slots[order]

