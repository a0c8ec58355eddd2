"""Tiny ViT-family models of the real classes, built in-process, with 8x8 = 64 patch grids (enough to prune)."""

from __future__ import annotations

import copy

import timm
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

IMAGE, PATCH, CHANNELS = 32, 4, 3
HF_COMMON = dict(image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, hidden_size=32, num_hidden_layers=4,
                 num_attention_heads=2, intermediate_size=64)


def _timm(**kwargs):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=10, **kwargs
    )


def _hf(cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(**HF_COMMON, **extra)
    config._attn_implementation = "sdpa"
    return cls(copy.deepcopy(config))


BUILDERS = {
    "timm_cls": lambda: _timm(),
    "timm_no_cls": lambda: _timm(class_token=False, global_pool="avg"),
    "timm_registers": lambda: _timm(reg_tokens=4),
    "timm_layerscale": lambda: _timm(init_values=0.5),
    "timm_qknorm": lambda: _timm(qk_norm=True),
    "hf_vit": lambda: _hf(ViTModel, ViTConfig),
    "hf_vit_cls": lambda: _hf(ViTForImageClassification, ViTConfig, num_labels=10),
    "hf_clip": lambda: _hf(CLIPVisionModel, CLIPVisionConfig),
    "hf_siglip": lambda: _hf(SiglipVisionModel, SiglipVisionConfig),
}

PROTECTED = {"timm_cls": 1, "timm_no_cls": 0, "timm_registers": 5, "timm_layerscale": 1, "timm_qknorm": 1,
             "hf_vit": 1, "hf_vit_cls": 1, "hf_clip": 1, "hf_siglip": 0}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def output(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tensor a user reads: logits for classifiers, the last hidden state's pooled output otherwise."""
    with torch.no_grad():
        out = model(pixels) if isinstance(model, torch.nn.Module) and model.__class__.__module__.startswith("timm") else model(pixel_values=pixels)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.pooler_output
