"""LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): fewer AnyRes tokens reach the LLM.

LLaVA-NeXT ("AnyRes", Liu et al. 2024, HF ``modeling_llava_next``) encodes an image as
several *views* of the vision tower: a thumbnail (the whole image resized) and a
grid of crops of the padded image. ``pack_image_features`` then builds the LLM
input: the thumbnail's tokens, then the crops stitched into one canvas, cut back to
the image's aspect ratio (``unpad_image``), with the learned ``image_newline``
embedding after every canvas row.

Sites (METHODS.md sec. 0.3):

* ``vit``, ``vit_output`` (H2), ``projector_output`` (H3): as on LLaVA-1.5
  (:mod:`.llava`). The tower's batch is the views, so every view (thumbnail and
  each crop) is reduced separately, with its own budget and its own [CLS] q/k.
* ``anyres``: the method sees all views of one image together when they are packed,
  with the q/k of the **last** ViT layer (probe P1 from its q/k projections; SDPA
  stays on), and returns the kept patches of each view (GlobalCom2, METHODS.md B8).
* ``llm`` (H4/H5): cuts inside the language model, as on LLaVA-1.5: the stock
  packing runs untouched (none of the machinery below is installed) and the
  visual tokens are each image's whole placeholder run, ``input_ids ==
  image_token_id``: thumbnail, unpadded canvas *and* the ``image_newline``
  embeddings, which the in-LLM references treat as image tokens like any other.
  Runs differ per image and per sample (no count at apply): each prefill solves
  the method's cuts for each sample's count, and a budget an image cannot meet
  raises ConfigError there; samples of one batch may differ (the ragged scheme of
  :mod:`.decoder`).

Stock packing needs full crop grids, so the adapter packs reduced views itself
(:func:`pack_views`): the thumbnail's tokens as the method left them, then each kept
crop token at its place on the unpadded canvas in row-major order, each canvas row
followed by ``image_newline``. At the vision sites a row keeps its newline only if
it keeps a token; at the ``anyres`` site every canvas row keeps it (GlobalCom2,
METHODS.md B8.2 step 3.6, library default). Tokens with no single place (merged ones,
e.g. VisionZip's contextual tokens) follow the canvas. With nothing removed this is
exactly the stock packing (a contract test).

Placeholder counts differ per image: :meth:`LlavaNextAdapter.layout` derives each
image's stock count from its size with the model's own ``get_anyres_image_grid_shape``
/ ``unpad_image``. The packer records that count against the packed tensor it
returns (``generate()`` encodes images before the prefill and does not pass
``image_sizes`` on), and :class:`PlaceholderShrinker` looks it up to drop each
image's surplus placeholders.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import QKCapture, TowerRun, ViewsSite, replace_forward
from ..registry import register_adapter
from .base import Undo
from .decoder import DecoderRun
from .llava import LlavaAdapter, Placeholders, PlaceholderShrinker, VlmRun
from .vit import VitTowerAdapter

_NEXT = "transformers.models.llava_next.modeling_llava_next"

# (features of one image's views [V, K, C], index of its first view in the tower batch, layout)
#   -> (thumbnail tokens [k0, C], crop tokens [M, C], their canvas ids [M] (crop * P + patch, -1: no place))
ViewSelector = Callable[[torch.Tensor, int, "AnyresLayout"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's crop tokens go in LLaVA-NeXT's packed sequence."""

    views: int  # thumbnail + crops
    patches: int  # patch tokens per view
    crop_grid: tuple[int, int]  # (rows, cols) of crops; (0, 0) for a single view
    canvas: torch.Tensor  # [Hv, Wv] long, crop * patches + patch of each token left after unpadding

    @property
    def tokens(self) -> int:
        """Stock packed length: thumbnail + unpadded canvas + one newline per canvas row (single view: + 1 newline)."""
        if self.views == 1:
            return self.patches + 1
        rows, cols = self.canvas.shape
        return self.patches + rows * (cols + 1)


def pack_views(
    base: torch.Tensor, crop_tokens: torch.Tensor, crop_ids: torch.Tensor, layout: AnyresLayout,
    newline: torch.Tensor | None, every_row: bool,
) -> torch.Tensor:
    """One image's LLM input from its reduced views: thumbnail, canvas rows (+ newline), then unplaced tokens.

    base [k0, C]; crop_tokens [M, C]; crop_ids [M] long (crop * P + patch, -1 for a token
    without a place). Crop tokens in the padding that unpadding removes are dropped,
    as stock LLaVA-NeXT drops them. ``every_row``: a newline after every canvas row,
    else only after rows that keep a token.
    """
    if layout.views == 1:
        return base if newline is None else torch.cat([base, newline[None].to(base)])
    rows, cols = layout.canvas.shape
    stride = cols + 1  # a row's tokens, then its newline
    key_of = torch.full((layout.crop_grid[0] * layout.crop_grid[1] * layout.patches,), -1, dtype=torch.long, device=crop_ids.device)
    slots = torch.arange(rows * stride, device=crop_ids.device).view(rows, stride)[:, :cols]
    key_of[layout.canvas.to(crop_ids.device).flatten()] = slots.flatten()
    placed = crop_ids >= 0
    keys = torch.where(placed, key_of[crop_ids.clamp_min(0)], -1)
    on_canvas = keys >= 0
    keys, tokens = keys[on_canvas], crop_tokens[on_canvas]
    if newline is not None:
        lines = torch.arange(rows, device=keys.device) if every_row else torch.unique(keys // stride)
        keys = torch.cat([keys, lines * stride + cols])
        tokens = torch.cat([tokens, newline.to(tokens)[None].expand(lines.shape[0], -1)])
    return torch.cat([base, tokens[keys.argsort()], crop_tokens[~placed]])


@register_adapter(f"{_NEXT}.LlavaNextForConditionalGeneration", f"{_NEXT}.LlavaNextModel")
class LlavaNextAdapter(LlavaAdapter):
    """Visual-token reduction for LLaVA-NeXT (AnyRes thumbnail + crops, unpadding, newline tokens)."""

    sites = frozenset({"vit", "vit_output", "projector_output", "anyres", "llm"})
    provides = frozenset()  # the tower's batch is views: prompt embeddings are not routed to them (no CDPruner)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = self.inner.config
        if not self.drop_cls:
            raise UnsupportedModelError(
                f"{type(model).__name__}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
                "LLaVA-NeXT stitches crop grids of patch tokens, so tokenreduce supports 'default' only"
            )
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        self._grid_shape, self._unpad = get_anyres_image_grid_shape, unpad_image
        self.pinpoints = config.image_grid_pinpoints
        self.view_size = config.vision_config.image_size
        self.score_tower = VitTowerAdapter(self.inner.vision_tower)  # every block: the last one scores at ``anyres``
        self._stock_tokens: dict[int, tuple[weakref.ref, int]] = {}  # id(packed image) -> (weak ref, stock count)

    def modules_touched(self) -> list[nn.Module]:
        return [*super().modules_touched(), self.score_tower.blocks[-1]]

    def layout(self, image_size: Any, views: int) -> AnyresLayout:
        """Crop grid and unpadded canvas of an image of ``image_size`` (height, width) encoded as ``views`` views."""
        rows, cols = self.tower.grid
        patches = rows * cols
        if views == 1:
            return AnyresLayout(1, patches, (0, 0), torch.zeros(0, 0, dtype=torch.long))
        crop_rows, crop_cols = self._grid_shape(image_size, self.pinpoints, self.view_size)
        if crop_rows * crop_cols != views - 1:
            raise ValueError(f"tokenreduce: an image of size {image_size} has a {crop_rows}x{crop_cols} crop grid but {views - 1} crop views")
        ids = torch.arange(views - 1, dtype=torch.long).view(crop_rows, crop_cols, 1, 1) * patches
        ids = (ids + torch.arange(patches).view(1, 1, rows, cols)).permute(0, 2, 1, 3).reshape(1, crop_rows * rows, crop_cols * cols)
        return AnyresLayout(views, patches, (crop_rows, crop_cols), self._unpad(ids, image_size)[0])

    def _record(self, image: torch.Tensor, tokens: int) -> None:
        self._stock_tokens = {key: entry for key, entry in self._stock_tokens.items() if entry[0]() is not None}
        self._stock_tokens[id(image)] = (weakref.ref(image), tokens)

    def stock_tokens(self, image: torch.Tensor) -> int | None:
        """The stock packed length of an image this adapter packed (None if it did not pack this tensor)."""
        ref, tokens = self._stock_tokens.get(id(image), (None, 0))
        return tokens if ref is not None and ref() is image else None

    def placeholders(self) -> Placeholders:
        def per_image(_kwargs: dict[str, Any], features: list[torch.Tensor]) -> list[int]:
            counts = [self.stock_tokens(f) for f in features]
            if None in counts:
                raise ValueError(
                    "tokenreduce: LLaVA-NeXT image features must come from this model's get_image_features while the "
                    "method is attached (pass pixel_values and image_sizes, not features encoded before apply())"
                )
            return counts

        return per_image

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Only the vision path (tower, projector, packing): the visual tokens the LLM would receive per image."""
        if image_sizes is None:
            raise ValueError("tokenreduce: LLaVA-NeXT needs image_sizes (height, width per image) to encode images")
        return list(self.inner.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True).pooler_output)

    def attach(self, method: Any) -> tuple[list[Undo], VlmRun | DecoderRun]:
        if self.site == "llm":
            return super().attach(method)
        if self.site == "anyres":
            capture = QKCapture()
            seam = self.score_tower.seam(self.score_tower.blocks[-1])
            undo: list[Undo] = [h.remove for h in seam.install_capture(capture)]
            vision = None
            select = self._method_selector(method, capture, seam.scale)
        else:
            undo, vision = self.attach_vision(method)
            select = self._vision_selector(vision)
        undo.append(replace_forward(self.inner, self._packer(select, every_row=self.site == "anyres"), "pack_image_features"))
        run = VlmRun(vision=vision)
        shrinker = PlaceholderShrinker(
            self.inner, self.image_token_id, self.pad_token_id, self.placeholders(), run, positions=method.config.positions,
        )
        undo.append(replace_forward(self.inner, shrinker))
        return undo, run

    def _packer(self, select: ViewSelector, every_row: bool) -> Callable[..., tuple[list[torch.Tensor], torch.Tensor]]:
        """The ``pack_image_features`` replacement: same arguments and results as the stock one."""

        def pack(image_features: Any, image_sizes: Any, vision_feature_select_strategy: Any = None, image_newline: Any = None) -> tuple[list[torch.Tensor], torch.Tensor]:
            packed, start = [], 0
            for features, size in zip(image_features, image_sizes):
                layout = self.layout(size, features.shape[0])
                base, crop_tokens, crop_ids = select(features, start, layout)
                packed.append(pack_views(base, crop_tokens, crop_ids, layout, image_newline, every_row))
                self._record(packed[-1], layout.tokens)
                start += features.shape[0]
            return packed, torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)

        return pack

    def _vision_selector(self, vision: TowerRun) -> ViewSelector:
        """Views already reduced in the tower or projector: places from the run's original positions."""
        offset = 0 if self.site == "projector_output" else self.tower.protected  # [CLS] was dropped after the tower

        def select(features: torch.Tensor, start: int, layout: AnyresLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            views = slice(start, start + features.shape[0])
            patch = vision.positions[views, offset:] - offset  # [V, K]
            crops = torch.arange(features.shape[0] - 1, device=patch.device).unsqueeze(1) * layout.patches
            ids = torch.where(patch[1:] >= 0, patch[1:] + crops, -1)
            if vision.valid is None:
                return features[0], features[1:].flatten(0, 1), ids.flatten()
            valid = vision.valid[views, offset:]  # adaptive counts: drop each view's padding
            return features[0][valid[0]], features[1:][valid[1:]], ids[valid[1:]]

        return select

    def _method_selector(self, method: Any, capture: QKCapture, scale: float) -> ViewSelector:
        """The method picks each view's patches from all views of the image (``plan_views``)."""

        def select(features: torch.Tensor, start: int, layout: AnyresLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            views = slice(start, start + features.shape[0])
            q = None if capture.q is None else capture.q[views]
            k = None if capture.k is None else capture.k[views]
            site = ViewsSite(
                features=features, q=q, k=k, scale=scale, has_cls=self.tower.has_cls, grid=self.tower.grid,
                crop_grid=layout.crop_grid, canvas=layout.canvas.to(features.device),
            )
            keep = method.plan_views(site)
            if capture.k is not None and views.stop == capture.k.shape[0]:  # last image of the tower batch
                capture.clear()
            crops = [features[c][keep[c]] for c in range(1, features.shape[0])]
            ids = [keep[c] + (c - 1) * layout.patches for c in range(1, features.shape[0])]
            empty = features.new_zeros(0, features.shape[-1])
            return features[0][keep[0]], torch.cat(crops) if crops else empty, torch.cat(ids) if ids else keep[0][:0]

        return select
