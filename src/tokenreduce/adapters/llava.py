"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): fewer visual tokens reach the LLM.

Three sites (METHODS.md sec. 0.3):

* ``vit`` (H1): a ViT method (ToMe, FiCoCo-V, ...) inside the vision tower, in the
  blocks up to the feature layer (``vision_feature_layer``; later blocks cannot
  change what the LLM sees);
* ``vit_output`` (H2): one reduction of the feature layer's output, [CLS] at index 0,
  with that block's q and k for [CLS]-attention scores (FasterVLM, VisionZip, the
  baselines);
* ``projector_output`` (H3): one reduction of the projected visual embeddings
  (DivPrune, CDPruner).

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
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import QKCapture, TowerRun, reduce_module_output, replace_forward
from ..registry import register_adapter
from .base import Adapter, Undo
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
    placeholders_per_image: int = 0
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
        labels = self.vision.positions if self.vision is not None else None
        if labels is None or labels.shape != (len(kept), max(kept) + self.first_feature) or len(set(kept)) != 1:
            return [torch.arange(k) for k in kept]
        labels = labels[:, self.first_feature :] - self.first_feature
        return list(torch.where(labels >= 0, labels, torch.arange(labels.shape[1], device=labels.device)))

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


class PlaceholderShrinker:
    """The ``LlavaModel.forward`` wrapper that keeps placeholders, masks and positions consistent."""

    def __init__(
        self, inner: nn.Module, image_token_id: int, pad_token_id: int, placeholders: int, run: VlmRun,
        positions: Literal["original", "compact"] = "original",
    ) -> None:
        self.inner = inner
        self.positions = positions  # "original" or "compact", see the module docstring
        self.placeholders = placeholders  # per image, as the processor expands <image>
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
            encoded["image"] = self.inner.get_image_features(
                pixel_values=kwargs["pixel_values"],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                image_sizes=kwargs.get("image_sizes"),
                return_dict=True,
            )
            kwargs["pixel_values"], kwargs["mm_encoder_outputs"] = None, encoded
        if encoded.get("image") is not None:
            self._shorten_prefill(kwargs, [f.shape[0] for f in encoded["image"].pooler_output])
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

    def _shorten_prefill(self, kwargs: dict[str, Any], kept: list[int]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("tokenreduce: pass input_ids (not only inputs_embeds) so the image placeholders can be found")
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("tokenreduce: an image in a prompt that continues an existing KV cache is not supported")
        is_image = ids == self.image_token_id
        per_sample = is_image.sum(dim=1)
        placeholders, images = self.placeholders, len(kept)
        if int(per_sample.sum()) != images * placeholders or any(int(n) % placeholders for n in per_sample):
            raise ValueError(
                f"tokenreduce: {images} image(s) need {images} runs of {placeholders} image placeholder tokens, "
                f"got {per_sample.tolist()} placeholders per sample"
            )
        run = self.run
        run.prefills += 1
        run.images, run.tokens_per_image, run.placeholders_per_image = images, kept, placeholders
        run.sequence_in = ids.shape[1]
        slots = run.feature_slots(kept)
        run.slots_per_image = [s.tolist() for s in slots]
        if all(k == placeholders for k in kept):
            run.sequence_out, run.prefill = [ids.shape[1]] * ids.shape[0], None
            return
        if any(k > placeholders for k in kept):
            raise ValueError(f"tokenreduce: an image produced {max(kept)} features for {placeholders} placeholders")
        keep = ~is_image
        origin = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        image_index = 0
        for b in range(ids.shape[0]):
            for run_slots in is_image[b].nonzero()[:, 0].view(-1, placeholders):
                count = kept[image_index]
                keep[b, run_slots[:count]] = True
                origin[b, run_slots[:count]] = run_slots[slots[image_index].to(run_slots.device)]
                image_index += 1
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


def _is_new_prompt(kwargs: dict[str, Any]) -> bool:
    cache = kwargs.get("past_key_values")
    return cache is None or cache.get_seq_length() == 0


@register_adapter(f"{_LLAVA}.LlavaForConditionalGeneration", f"{_LLAVA}.LlavaModel")
class LlavaAdapter(Adapter):
    """Visual-token reduction for LLaVA-1.5-style models (one vision tower, one projector, one LLM)."""

    sites = frozenset({"vit", "vit_output", "projector_output"})
    position_modes = frozenset({"original", "compact"})

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

    def modules_touched(self) -> list[nn.Module]:
        return [self.inner, self.inner.multi_modal_projector, *self.tower.blocks]

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Only the vision path (tower, selection, projector): the visual tokens the LLM would receive."""
        return list(self.inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output)

    def describe(self) -> dict[str, Any]:
        facts = dict(self.tower.describe(), default_layer=self.feature_block)
        if self.site == "projector_output":
            facts.update(num_layers=1, default_layer=0, protected_tokens=0 if self.drop_cls else self.tower.protected)
        return facts

    def attach(self, method: Any) -> tuple[list[Undo], VlmRun]:
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
        run = VlmRun(vision=vision, first_feature=int(self.drop_cls and self.site != "projector_output"))
        placeholders = tower.grid[0] * tower.grid[1] + (0 if self.drop_cls else tower.protected)
        positions = getattr(method.config, "positions", "original")
        shrinker = PlaceholderShrinker(self.inner, self.image_token_id, self.pad_token_id, placeholders, run, positions)
        undo.append(replace_forward(self.inner, shrinker))
        return undo, run
