"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): fewer visual tokens reach the LLM.

Three sites (METHODS.md sec. 0.3):

* ``vit`` (H1): a ViT method (ToMe, FiCoCo-V, ...) inside the vision tower, in the
  blocks up to the feature layer (``vision_feature_layer``; later blocks cannot
  change what the LLM sees);
* ``vit_output`` (H2): one reduction of the feature layer's output, [CLS] at index 0,
  with that block's q and k for [CLS]-attention scores (FasterVLM, VisionZip, the
  baselines);
* ``projector_output`` (H3): one reduction of the projected visual embeddings
  (DivPrune, CDPruner);
* ``llm`` (H4/H5): cuts inside the language model (FastV, PyramidDrop, DART), run
  by the decoder machinery of :mod:`.decoder`; this adapter only reports each
  prompt's visual tokens (``input_ids == image_token_id``). Both ``positions``
  modes apply: the language model is a Llama-family decoder with 1-D positions.

Whatever the site, the image features end up shorter than the placeholder runs the
processor expanded. :class:`PlaceholderShrinker` wraps ``LlavaModel.forward``: at
prefill it drops the surplus placeholder columns of each sample (per image, no
hard-coded offsets: spans come from ``input_ids == image_token_id``) from
``input_ids`` and ``attention_mask``; at each decode step that continues the same KV
cache it drops the same columns from the attention mask. Nothing of the model's own
code is copied: image features come from its ``get_image_features`` and the LLM runs
its own forward.

Positions (DESIGN.md sec. 4.3), chosen by the config's ``positions`` field:

* ``"original"`` (default): every token keeps the RoPE position it had in the
  full-length prompt (the given ``position_ids``, or the column index the stock
  model uses when none are given); a visual token takes the position of the
  placeholder of the patch it came from (the tower run labels every surviving
  token with its original index; a token made anew, such as a pooled cell, keeps
  the placeholder it fills), and decoding continues after the original length. For
  a pruning method this equals the stock model with the removed patches' columns
  masked out. ``generate()`` equals the stock model fed the pruned embeddings
  together with these position ids (``stats()["visual_slots"]``).
* ``"compact"``: the shortened sequence is re-indexed 0..L'-1 (text after an image
  moves back by the removed count) and decode positions move back by the same
  count: what reference implementations get by building shorter ``inputs_embeds``.
  ``generate()`` equals the stock model fed the pruned embeddings alone.

:class:`ImageEncoder` shadows ``get_image_features`` with two services for
methods: it hands each image's prompt text to the site (``Site.text``,
CDPruner's relevance) and keeps each image's real tokens after an
adaptive-count method (PruMerge, ``TokenPlan.valid``), so counts differ per image
and the placeholder runs are shortened per image.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import QKCapture, TowerRun, reduce_module_output, replace_forward
from ..methods.inllm import DecoderMethod
from ..registry import register_adapter
from .base import Adapter, Undo
from .decoder import DecoderRun, attach_decoder, decoder_shape
from .vit import VitTowerAdapter

_LLAVA = "transformers.models.llava.modeling_llava"


@dataclass
class PrefillShape:
    """How a prefill was shortened, so decode steps on the same cache can follow."""

    cache: Any  # weakref to the KV cache built by the shortened prefill
    length: int  # original prompt length
    columns: torch.Tensor  # [B, L'] original column of each kept column, -1 for added padding
    shift: torch.Tensor  # [B] real tokens removed per sample (compact position ids move back by this)

    @property
    def removed_columns(self) -> int:
        """How much shorter the cache is than the stock model's: the offset of its implicit positions."""
        return self.length - self.columns.shape[1]


@dataclass
class VlmRun:
    """Run state of a VLM: the vision-side reduction plus the sequence shortening."""

    vision: TowerRun | None
    images: int = 0
    tokens_per_image: list[int] = field(default_factory=list)
    slots_per_image: list[list[int]] = field(default_factory=list)  # placeholder each visual token takes its position from
    placeholders_per_image: int | list[int] = 0
    sequence_in: int = 0
    sequence_out: list[int] = field(default_factory=list)
    prefills: int = 0
    prefill: PrefillShape | None = None
    first_feature: int = 0  # tower index of the first token the LLM receives (1 when [CLS] is dropped after the tower)

    def feature_slots(self, kept: list[int]) -> list[torch.Tensor]:
        """Per image, the placeholder slot (patch index in the LLM's image run) each received visual token came from.

        The tower run labels every surviving token with its original index; a token made
        anew (a pooled cell, a merged contextual token) has no single origin and keeps
        the slot it occupies, as does every token when the labels do not describe these
        features (features passed in precomputed).
        """
        fallback = [torch.arange(k) for k in kept]
        labels = self.vision.positions if self.vision is not None else None
        if labels is None or labels.shape[0] != len(kept):
            return fallback
        first = self.first_feature
        valid = self.vision.valid  # adaptive counts: each image's padding was dropped before the LLM
        slots = []
        for image, count in enumerate(kept):
            row = labels[image, first:] if valid is None else labels[image, first:][valid[image, first:]]
            if row.shape[0] != count:
                return fallback
            slots.append(torch.where(row >= first, row - first, torch.arange(count, device=row.device)))
        return slots

    def stats(self) -> dict[str, Any]:
        stats = {
            "images": self.images,
            "visual_tokens_in": self.placeholders_per_image,
            "visual_tokens_out": list(self.tokens_per_image),
            "visual_slots": [list(slots) for slots in self.slots_per_image],
            "sequence_in": self.sequence_in,
            "sequence_out": list(self.sequence_out),
            "prefills": self.prefills,
        }
        if self.images == 0 and self.prefills:
            stats["note"] = "no image in the last prompt: nothing to reduce"
        if self.vision is not None:
            stats["vision"] = self.vision.stats()
        return stats

    def surviving_patches(self) -> torch.Tensor | None:
        return None if self.vision is None else self.vision.surviving_patches()

    def reset(self) -> None:
        self.prefills = 0
        self.prefill = None
        if self.vision is not None:
            self.vision.reset()


Placeholders = int | Callable[[dict[str, Any], list[torch.Tensor]], list[int]]


class ImageEncoder:
    """Shadows ``LlavaModel.get_image_features``: the prompt's text goes in, each image's real tokens come out.

    Whoever encodes the images (the model's forward, ``generate()``, which in
    transformers 5 encodes them before the first forward, or a user) gets:

    * ``Site.text``: the LLM's own input embeddings of the sample's text tokens,
      for each image, when the prompt is known (set by :meth:`prompt_of` around
      the call). CDPruner's relevance (METHODS.md B6) compares the projected visual
      tokens with the instruction; like the OpenVINO GenAI port, the instruction
      is the LLM's embedding of the prompt, so no text tower is needed. Images map
      to samples in order (the placeholder runs of sample 0 first).
    * per-image features without the padding an adaptive-count method left
      (``TowerRun.valid``), so counts may differ per image.
    """

    def __init__(
        self, inner: nn.Module, run: VlmRun, image_token_id: int, placeholders: int, cls_dropped: bool, share_text: bool,
    ) -> None:
        self.inner = inner
        self.share_text = share_text  # only for methods that read Site.text: the embedding lookup is not free
        self.original = inner.get_image_features
        self.run = run
        self.image_token_id = image_token_id
        self.placeholders = placeholders
        self.cls_dropped = int(cls_dropped)  # the site's token 0 is a [CLS] that feature selection drops
        self.prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextlib.contextmanager
    def prompt_of(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Images encoded inside this block belong to this prompt (no-op when ``input_ids`` is None)."""
        previous = self.prompt
        if input_ids is not None:
            self.prompt = (input_ids, attention_mask)
        try:
            yield
        finally:
            self.prompt = previous

    def __call__(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        vision = self.run.vision
        self._share_text(vision, pixel_values.shape[0])
        try:
            out = self.original(pixel_values, *args, **kwargs)
        finally:
            vision.text = vision.text_mask = None
        if vision.valid is not None and hasattr(out, "pooler_output"):
            out.pooler_output = [f[v] for f, v in zip(out.pooler_output, vision.valid[:, self.cls_dropped :])]
        return out

    def _share_text(self, vision: TowerRun, images: int) -> None:
        if self.prompt is None or not self.share_text:
            return
        ids, mask = self.prompt
        per_sample = (ids == self.image_token_id).sum(dim=1) // self.placeholders
        if int(per_sample.sum()) != images:
            return  # a mismatch that PlaceholderShrinker reports
        text = ids != self.image_token_id
        if mask is not None:
            text &= mask > 0
        vision.text = self.inner.get_input_embeddings()(ids).repeat_interleave(per_sample, dim=0)
        vision.text_mask = text.repeat_interleave(per_sample, dim=0)


def _generate_with_prompt(generate: Any, encoder: ImageEncoder) -> Any:
    """``generate()`` encodes images before any forward sees the prompt: tell the encoder the prompt first."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs"))
        with encoder.prompt_of(ids if isinstance(ids, torch.Tensor) else None, kwargs.get("attention_mask")):
            return generate(*args, **kwargs)

    return wrapper


class PlaceholderShrinker:
    """The ``LlavaModel.forward`` wrapper that keeps placeholders, masks and positions consistent.

    ``placeholders`` is the number of placeholders the processor expands each
    ``<image>`` into: one int (LLaVA-1.5), or a function of the forward's keyword
    arguments and the (reduced) features of each image giving one count per image
    (LLaVA-NeXT's AnyRes counts depend on each image's size).
    """

    def __init__(
        self, inner: nn.Module, image_token_id: int, pad_token_id: int, placeholders: Placeholders, run: VlmRun,
        encoder: ImageEncoder | None = None, positions: Literal["original", "compact"] = "original",
    ) -> None:
        self.inner = inner
        self.encoder = encoder
        self.positions = positions  # "original" or "compact", see the module docstring
        self.placeholders = placeholders
        self.original = inner.forward
        self.signature = inspect.signature(self.original)
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.run = run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        if kwargs.get("pixel_values") is not None and encoded.get("image") is None:
            with self.encoder.prompt_of(kwargs.get("input_ids"), kwargs.get("attention_mask")) if self.encoder else contextlib.nullcontext():
                encoded["image"] = self._image_features(kwargs)
            kwargs["pixel_values"], kwargs["mm_encoder_outputs"] = None, encoded
        if encoded.get("image") is not None:
            self._shorten_prefill(kwargs, list(encoded["image"].pooler_output))
        elif self._continues_prefill(kwargs):
            self._follow_decode(kwargs)
        elif kwargs.get("input_ids") is not None and _is_new_prompt(kwargs):
            self.run.prefills += 1
            self.run.images, self.run.prefill = 0, None
        output = self.original(**kwargs)
        prefill = self.run.prefill
        if prefill is not None and prefill.cache is None and getattr(output, "past_key_values", None) is not None:
            prefill.cache = weakref.ref(output.past_key_values)  # the LLM made it: a hand loop continues this one
        return output

    def _image_features(self, kwargs: dict[str, Any]) -> Any:
        """The model's own image encoding of ``pixel_values`` (reduced by the hooks the adapter installed)."""
        return self.inner.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            image_sizes=kwargs.get("image_sizes"),
            return_dict=True,
        )

    @staticmethod
    def _prefill_inputs(kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """``input_ids`` and the cache of a prefill with images; what cannot be shortened is refused here."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("tokenreduce: pass input_ids (not only inputs_embeds) so the image placeholders can be found")
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("tokenreduce: an image in a prompt that continues an existing KV cache is not supported")
        return ids, cache

    def _shorten_prefill(self, kwargs: dict[str, Any], features: list[torch.Tensor]) -> None:
        ids, cache = self._prefill_inputs(kwargs)
        is_image = ids == self.image_token_id
        kept, images = [f.shape[0] for f in features], len(features)
        fixed = isinstance(self.placeholders, int)
        expected = [self.placeholders] * images if fixed else self.placeholders(kwargs, features)
        runs = runs_per_sample(is_image.sum(dim=1).tolist(), expected)
        if runs is None:
            wanted = expected[0] if fixed else expected
            raise ValueError(
                f"tokenreduce: {images} image(s) need {images} runs of {wanted} image placeholder tokens, "
                f"got {is_image.sum(dim=1).tolist()} placeholders per sample"
            )
        run = self.run
        run.prefills += 1
        run.images, run.tokens_per_image = images, kept
        run.placeholders_per_image = expected[0] if fixed else expected
        run.sequence_in = ids.shape[1]
        slots = run.feature_slots(kept)
        run.slots_per_image = [s.tolist() for s in slots]
        if kept == expected:
            run.sequence_out, run.prefill = [ids.shape[1]] * ids.shape[0], None
            return
        if any(k > n for k, n in zip(kept, expected)):
            raise ValueError(f"tokenreduce: an image produced more features than placeholders ({kept} for {expected})")
        keep = ~is_image
        origin = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        for b, images in enumerate(runs):
            for image, run_slots in zip(images, is_image[b].nonzero()[:, 0].split([expected[i] for i in images])):
                count = kept[image]
                keep[b, run_slots[:count]] = True
                origin[b, run_slots[:count]] = run_slots[slots[image].to(run_slots.device)]
        self._gather(kwargs, keep, origin, cache)

    def _gather(self, kwargs: dict[str, Any], keep: torch.Tensor, origin: torch.Tensor, cache: Any) -> None:
        """Keep the ``keep`` columns; ``origin`` is the column whose position each one takes in "original" mode.

        Features fill the first placeholders of their run in the order the vision side
        returns them (``masked_scatter``), so a kept column's own index is not where its
        patch was: ``origin`` maps it back to the placeholder of that patch.
        """
        ids = kwargs["input_ids"]
        batch, length = ids.shape
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        counts = keep.sum(dim=1)
        width = int(counts.max())
        right_padded = bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
        order = torch.arange(length, device=ids.device).expand(batch, length)
        kept_first = torch.where(keep, order, order + length).sort(dim=1).values[:, :width]  # kept columns, ascending
        slot = torch.arange(width, device=ids.device)
        filled = slot < counts.unsqueeze(1) if right_padded else slot >= (width - counts).unsqueeze(1)
        if not right_padded:
            kept_first = kept_first.gather(1, (slot - (width - counts).unsqueeze(1)).clamp_min(0))
        columns = torch.where(filled, kept_first, -1)
        source = columns.clamp_min(0)
        kwargs["input_ids"] = torch.where(filled, ids.gather(1, source), self.pad_token_id)
        new_mask = torch.where(filled, mask.gather(1, source), 0)
        shift = mask.sum(dim=1) - new_mask.sum(dim=1)
        # Always explicit: added padding must be masked, and without a mask transformers reads
        # the jumps in original position ids as boundaries of packed sequences.
        kwargs["attention_mask"] = new_mask
        positions = kwargs.get("position_ids")
        if self.positions == "original":
            positions = (order if positions is None else positions.expand(batch, length)).gather(1, origin)
        elif positions is not None:
            positions = positions - (~keep & (mask > 0)).cumsum(dim=1)
        if positions is not None:
            kwargs["position_ids"] = torch.where(filled, positions.gather(1, source), 1)
        self.run.sequence_out = counts.tolist()
        self.run.prefill = PrefillShape(weakref.ref(cache) if cache is not None else None, length, columns, shift)

    def _continues_prefill(self, kwargs: dict[str, Any]) -> bool:
        prefill = self.run.prefill
        cache = kwargs.get("past_key_values")
        return prefill is not None and cache is not None and prefill.cache is not None and prefill.cache() is cache

    def _follow_decode(self, kwargs: dict[str, Any]) -> None:
        prefill = self.run.prefill
        mask = kwargs.get("attention_mask")
        if mask is not None:
            head = torch.where(prefill.columns >= 0, mask[:, : prefill.length].gather(1, prefill.columns.clamp_min(0)), 0)
            kwargs["attention_mask"] = torch.cat([head, mask[:, prefill.length :]], dim=1)
        positions = kwargs.get("position_ids")
        if self.positions == "compact":
            if positions is not None:
                kwargs["position_ids"] = positions - prefill.shift.unsqueeze(1)
        elif positions is None:  # the stock model counts the cache; ours is shorter by the removed columns
            new = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
            start = kwargs["past_key_values"].get_seq_length() + prefill.removed_columns
            kwargs["position_ids"] = torch.arange(start, start + new, device=prefill.columns.device).unsqueeze(0)


def runs_per_sample(per_sample: list[int], placeholders: list[int]) -> list[list[int]] | None:
    """Assign images, in order, to the samples whose placeholder counts they fill exactly; None if they do not add up.

    per_sample: image placeholders in each sample; placeholders: the run length of each image.
    Returns the indices of each sample's images.
    """
    runs, image = [], 0
    for count in per_sample:
        mine = []
        while count > 0 and image < len(placeholders) and placeholders[image] <= count:
            count -= placeholders[image]
            mine.append(image)
            image += 1
        if count:
            return None
        runs.append(mine)
    return runs if image == len(placeholders) else None


def _placeholders(args: tuple, kwargs: dict[str, Any], token_ids: tuple[int, ...]) -> torch.Tensor | None:
    """[B, N] bool: the placeholders (any of ``token_ids``) of a multimodal model's call (None when it gets no ``input_ids``)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return None if ids is None else torch.isin(ids, torch.tensor(token_ids, device=ids.device))


def attach_language_model(inner: nn.Module, method: DecoderMethod, *token_ids: int) -> tuple[list[Undo], DecoderRun]:
    """Site ``llm`` of a multimodal model: the decoder machinery on ``inner.language_model``.

    The machinery needs each prompt's visual tokens, which only the multimodal model's
    ``input_ids`` show (the language model gets embeddings): ``inner.forward`` is
    wrapped to report the placeholders of ``token_ids`` before every call. A wrapper
    rather than a forward pre-hook: a vision-side stage attached after the LLM one (a
    staged method such as FiCoCo-VL, ``adapters/staged.py``) wraps this forward with
    its :class:`PlaceholderShrinker`, which calls it with the already shortened
    ``input_ids``, so the decoder sees the visual tokens that survived the vision
    stage; a pre-hook would run before the shrinker and see the full prompt.
    """
    undo, decoder = attach_decoder(inner.language_model, method)
    forward = inner.forward

    @functools.wraps(forward)  # keeps the signature, which a vision stage's shrinker binds the call's arguments to
    def reporting(*args: Any, **kwargs: Any) -> Any:
        decoder.expect_visual(_placeholders(args, kwargs, token_ids))
        return forward(*args, **kwargs)

    undo.append(replace_forward(inner, reporting))
    return undo, decoder


def _is_new_prompt(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("past_key_values")
    return cache is None or cache.get_seq_length() == 0


@register_adapter(f"{_LLAVA}.LlavaForConditionalGeneration", f"{_LLAVA}.LlavaModel")
class LlavaAdapter(Adapter):
    """Visual-token reduction for LLaVA-1.5-style models (one vision tower, one projector, one LLM)."""

    sites = frozenset({"vit", "vit_output", "projector_output", "llm"})
    provides = frozenset({"prompt_text"})  # ImageEncoder shares each image's prompt embeddings (Site.text)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner = model if hasattr(model, "multi_modal_projector") else model.model
        config = self.inner.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError(f"{type(model).__name__}: vision_feature_layer={layer!r}; tokenreduce supports one feature layer")
        tower_blocks = len(VitTowerAdapter(self.inner.vision_tower).blocks)
        self.feature_block = tower_blocks + layer if layer < 0 else layer - 1
        if not 0 <= self.feature_block < tower_blocks:
            raise UnsupportedModelError(f"{type(model).__name__}: vision_feature_layer={layer} is not the output of a vision block")
        self.tower = VitTowerAdapter(self.inner.vision_tower, depth=self.feature_block + 1)
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.image_token_id = config.image_token_id
        self.pad_token_id = getattr(config.text_config, "pad_token_id", None) or 0

    # Pre-LLM sites shorten the prompt and re-index it (PlaceholderShrinker); the Llama-family decoder's cuts re-index
    # their survivors (adapters/decoder.py).
    position_modes = frozenset({"original", "compact"})

    def modules_touched(self) -> list[nn.Module]:
        return [self.inner, self.inner.multi_modal_projector, *self.tower.blocks]

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Only the vision path (tower, selection, projector): the visual tokens the LLM would receive."""
        return list(self.inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)

    def describe(self) -> dict[str, Any]:
        facts = dict(self.tower.describe(), default_layer=self.feature_block)
        if self.site == "vit_output":
            facts.update(reducing_layers=(self.feature_block,))
        if self.site == "projector_output":
            facts.update(num_layers=1, default_layer=0, protected_tokens=0 if self.drop_cls else self.tower.protected)
        if self.site == "llm":
            placeholders = self.placeholders()  # a function of each image: counts are only known at each prefill
            facts.update(num_layers=len(self.inner.language_model.layers),
                         reducible_tokens=placeholders if isinstance(placeholders, int) else None,
                         decoder=decoder_shape(self.inner.language_model.config))
        return facts

    def attach(self, method: Any) -> tuple[list[Undo], VlmRun | DecoderRun]:
        if self.site == "llm":
            return attach_language_model(self.inner, method, self.image_token_id)
        undo, vision = self.attach_vision(method)
        cls_dropped = self.drop_cls and self.site != "projector_output"
        run = VlmRun(vision=vision, first_feature=int(cls_dropped))
        placeholders = self.placeholders()
        encoder = ImageEncoder(self.inner, run, self.image_token_id, placeholders, cls_dropped, "prompt_text" in method.requires)
        undo.append(replace_forward(self.inner, encoder, "get_image_features"))
        if self.model is not self.inner and hasattr(self.model, "generate"):
            undo.append(replace_forward(self.model, _generate_with_prompt(self.model.generate, encoder), "generate"))
        shrinker = PlaceholderShrinker(
            self.inner, self.image_token_id, self.pad_token_id, placeholders, run, encoder, positions=method.config.positions,
        )
        undo.append(replace_forward(self.inner, shrinker))
        return undo, run

    def placeholders(self) -> Placeholders:
        """Placeholders per image: the feature grid, plus [CLS] with the "full" strategy."""
        return self.tower.grid[0] * self.tower.grid[1] + (0 if self.drop_cls else self.tower.protected)

    def attach_vision(self, method: Any) -> tuple[list[Undo], TowerRun]:
        """Install ``method`` at the vision-side site (``vit``, ``vit_output`` or ``projector_output``)."""
        tower = self.tower
        undo: list[Undo] = []
        if self.site == "vit":
            undo, vision = tower.attach(method)
        elif self.site == "vit_output":
            vision = TowerRun(protected=tower.protected, has_cls=tower.has_cls, grid_for=tower.grid_for, method=method)
            capture = QKCapture()
            seam = tower.seam(tower.blocks[self.feature_block])
            undo = [h.remove for h in seam.install_capture(capture)]
            undo.append(reduce_module_output(tower.blocks[self.feature_block], self.feature_block, capture, seam.scale, vision))
        else:
            protected = 0 if self.drop_cls else tower.protected
            vision = TowerRun(protected=protected, has_cls=False, grid_for=tower.grid_for, method=method)
            undo = [reduce_module_output(self.inner.multi_modal_projector, 0, QKCapture(), 0.0, vision)]
        return undo, vision
