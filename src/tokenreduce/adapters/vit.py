"""Adapters for ViT-style encoders: timm ``VisionTransformer`` and HF ViT / CLIP / SigLIP vision towers.

Everything model-specific is in the :data:`LAYOUTS` table (module names inside a
block, how q and k are read) and the :data:`TOWERS` table (where the blocks are,
how many leading tokens are protected, whether token 0 is a [CLS]). Adding a ViT
family is one entry in each table plus a ``register_adapter`` line.

q and k are read with forward hooks on modules whose output *is* q or k:
timm's ``q_norm`` / ``k_norm`` (identity or qk-norm, shape [B, H, N, d]) and the
HF ``q_proj`` / ``k_proj`` projections ([B, N, H*d]; these models apply no RoPE or
qk-norm afterwards). The block's own attention keeps its fused SDPA path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..merge_slot import BlockSeam, QKCapture, TowerRun, own_block_forwards
from ..registry import lookup_by_class, register_adapter
from .base import Adapter, Undo


@dataclass(frozen=True)
class BlockLayout:
    """Submodule names of one pre-norm block and how its attention is called."""

    block_class: str
    norm1: str
    attn: str
    norm2: str
    mlp: str
    post_attn: tuple[str, ...]  # applied to the attention output before the residual (LayerScale, DropPath, dropout)
    post_mlp: tuple[str, ...]
    mask_kwarg: str
    q_module: str  # relative to attn
    k_module: str
    heads_first: bool  # q/k module output already [B, H, N, d]
    scale_attr: str
    attn_returns_tuple: bool


TIMM_BLOCK = BlockLayout(
    block_class="Block", norm1="norm1", attn="attn", norm2="norm2", mlp="mlp",
    post_attn=("ls1", "drop_path1"), post_mlp=("ls2", "drop_path2"), mask_kwarg="attn_mask",
    q_module="q_norm", k_module="k_norm", heads_first=True, scale_attr="scale", attn_returns_tuple=False,
)
HF_VIT_LAYER = BlockLayout(
    block_class="ViTLayer", norm1="layernorm_before", attn="attention", norm2="layernorm_after", mlp="mlp",
    post_attn=("dropout",), post_mlp=("dropout",), mask_kwarg="attention_mask",
    q_module="q_proj", k_module="k_proj", heads_first=False, scale_attr="scaling", attn_returns_tuple=True,
)
HF_CLIP_LAYER = BlockLayout(
    block_class="CLIPEncoderLayer", norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp",
    post_attn=(), post_mlp=(), mask_kwarg="attention_mask",
    q_module="q_proj", k_module="k_proj", heads_first=False, scale_attr="scale", attn_returns_tuple=True,
)
HF_SIGLIP_LAYER = BlockLayout(**{**HF_CLIP_LAYER.__dict__, "block_class": "SiglipEncoderLayer"})


@dataclass(frozen=True)
class TowerSpec:
    """Where a model's blocks are and which leading tokens are special."""

    blocks: str  # dotted path of the block list
    layout: BlockLayout
    has_cls: bool


_HF = "transformers.models"
TOWERS: dict[str, TowerSpec] = {
    "timm.models.vision_transformer.VisionTransformer": TowerSpec("blocks", TIMM_BLOCK, has_cls=True),
    f"{_HF}.vit.modeling_vit.ViTModel": TowerSpec("layers", HF_VIT_LAYER, has_cls=True),
    f"{_HF}.vit.modeling_vit.ViTForImageClassification": TowerSpec("vit.layers", HF_VIT_LAYER, has_cls=True),
    f"{_HF}.clip.modeling_clip.CLIPVisionModel": TowerSpec("encoder.layers", HF_CLIP_LAYER, has_cls=True),
    f"{_HF}.clip.modeling_clip.CLIPVisionModelWithProjection": TowerSpec("vision_model.encoder.layers", HF_CLIP_LAYER, has_cls=True),
    f"{_HF}.siglip.modeling_siglip.SiglipVisionModel": TowerSpec("encoder.layers", HF_SIGLIP_LAYER, has_cls=False),
}


def _spec_for(model: nn.Module) -> TowerSpec:
    spec = lookup_by_class(TOWERS, model)
    if spec is not None:
        return spec
    raise UnsupportedModelError(f"no ViT tower layout for {type(model).__name__}")


def _sequential(modules: list[nn.Module]) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        for module in modules:
            x = module(x)
        return x

    return run


class VitTowerAdapter(Adapter):
    """Token reduction between attention and MLP of every block of a ViT-style encoder.

    To support another ViT class, subclass with a fixed ``tower`` and register it:
    ``@tr.register_adapter(MyViT) class MyAdapter(VitTowerAdapter): tower = TowerSpec("blocks", TIMM_BLOCK, True)``.
    """

    sites = frozenset({"vit"})
    tower: TowerSpec | None = None

    def __init__(self, model: nn.Module, depth: int | None = None) -> None:
        super().__init__(model)
        spec = self.tower or _spec_for(model)
        self.spec = spec
        self.blocks: list[nn.Module] = list(model.get_submodule(spec.blocks))[:depth]
        layout = spec.layout
        for i, block in enumerate(self.blocks):
            if type(block).__name__ != layout.block_class:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: block {i} is a {type(block).__name__}; tokenreduce's ViT adapter supports "
                    f"{layout.block_class} blocks (pre-norm attention then MLP)"
                )
        if not self.blocks:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformer blocks at {spec.blocks!r}")
        self.protected, self.has_cls, self.grid = self._tokens(model, spec)

    @staticmethod
    def _tokens(model: nn.Module, spec: TowerSpec) -> tuple[int, bool, tuple[int, int]]:
        if spec.layout is TIMM_BLOCK:
            grid = tuple(model.patch_embed.grid_size)
            return model.num_prefix_tokens, model.cls_token is not None, grid  # type: ignore[return-value]
        config = model.config
        side = config.image_size // config.patch_size
        protected = 1 if spec.has_cls else 0
        return protected, spec.has_cls, (side, side)

    def modules_touched(self) -> list[nn.Module]:
        return list(self.blocks)

    def describe(self) -> dict[str, Any]:
        first = self.blocks[0]
        attn = first.get_submodule(self.spec.layout.attn)
        q = attn.get_submodule(self.spec.layout.q_module) if not self.spec.layout.heads_first else None
        dim = first.get_submodule(self.spec.layout.norm1).normalized_shape[0]
        mlp_dim = next(m for m in first.get_submodule(self.spec.layout.mlp).modules() if isinstance(m, nn.Linear)).out_features
        return {
            "num_layers": len(self.blocks),
            "default_layer": 0,
            "reducible_tokens": self.grid[0] * self.grid[1],
            "protected_tokens": self.protected,
            "has_cls": self.has_cls,
            "grid": self.grid,
            "dim": dim,
            "mlp_dim": mlp_dim,
            "attn_dim": q.out_features if q is not None else dim,
        }

    def grid_for(self, patches: int) -> tuple[int, int]:
        """The patch grid of an input with ``patches`` patch tokens (the configured one, or square)."""
        if patches == self.grid[0] * self.grid[1]:
            return self.grid
        side = int(round(patches**0.5))
        if side * side != patches:
            raise ValueError(f"tokenreduce: cannot infer the patch grid of {patches} patch tokens (configured grid {self.grid})")
        return (side, side)

    def attach(self, method: Any) -> tuple[list[Undo], TowerRun]:
        run = TowerRun(protected=self.protected, has_cls=self.has_cls, grid_for=self.grid_for, method=method)
        return own_block_forwards([self.seam(block) for block in self.blocks], run), run

    def seam(self, block: nn.Module) -> BlockSeam:
        """How to run ``block`` in halves and read its attention's q and k."""
        layout = self.spec.layout
        norm1, attn, norm2, mlp = (block.get_submodule(n) for n in (layout.norm1, layout.attn, layout.norm2, layout.mlp))
        post_attn = _sequential([block.get_submodule(n) for n in layout.post_attn])
        post_mlp = _sequential([block.get_submodule(n) for n in layout.post_mlp])
        head_dim = attn.head_dim

        def attend(x: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
            if layout.attn_returns_tuple:
                out = attn(hidden_states=norm1(x), attention_mask=mask, **kwargs)[0]
            else:
                out = attn(norm1(x), attn_mask=mask, **kwargs)
            return x + post_attn(out)

        def feed_forward(x: torch.Tensor) -> torch.Tensor:
            return x + post_mlp(mlp(norm2(x)))

        def split_args(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
            kwargs = dict(kwargs)
            mask = args[0] if args else kwargs.pop(layout.mask_kwarg, None)
            return mask, kwargs

        def to_heads(t: torch.Tensor) -> torch.Tensor:
            return t if layout.heads_first else t.view(*t.shape[:2], -1, head_dim).transpose(1, 2)

        def install_capture(capture: QKCapture) -> list[Any]:
            def keep_q(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                capture.q = to_heads(output)

            def keep_k(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
                capture.k = to_heads(output)

            return [
                attn.get_submodule(layout.q_module).register_forward_hook(keep_q),
                attn.get_submodule(layout.k_module).register_forward_hook(keep_k),
            ]

        return BlockSeam(
            module=block, attend=attend, feed_forward=feed_forward, split_args=split_args,
            install_capture=install_capture, scale=float(getattr(attn, layout.scale_attr)),
        )


register_adapter(*TOWERS)(VitTowerAdapter)
