"""A tiny ``LlavaNextForConditionalGeneration`` (AnyRes) built in-process: 144 tokens per view, 2-4 crops per image.

Views are 48 x 48 pixels with 4 x 4 patches (a 12 x 12 grid). The pinpoints give
1 x 2, 2 x 1, 2 x 2 and 1 x 3 crop grids; :data:`SIZES` picks images (height, width)
that land on 2, 3 and 4 crops, all with padding that LLaVA-NeXT's unpadding removes.
"""

from __future__ import annotations

import copy

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vlm_fixtures import BOS, IMAGE_TOKEN, PAD, batch  # noqa: F401  (re-exported for the tests)

VIEW, PATCH = 48, 4
VIEW_TOKENS = (VIEW // PATCH) ** 2  # 144
PINPOINTS = [[48, 96], [96, 48], [96, 96], [48, 144]]
SIZES = {"wide2": (40, 90), "wide3": (30, 140), "square4": (90, 80)}  # (height, width) -> 2, 3 and 4 crops


def llava_next(layers: int = 2) -> LlavaNextForConditionalGeneration:
    """The fixture; ``layers``: depth of its language model (in-LLM cuts need layers before and after them)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=VIEW, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_channels=3, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=PAD)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    config._attn_implementation = "sdpa"
    return LlavaNextForConditionalGeneration(copy.deepcopy(config)).eval()


def views(size: tuple[int, int]) -> int:
    """Thumbnail + crops for an image of ``size`` (height, width)."""
    return image_size_to_num_patches(list(size), PINPOINTS, VIEW)


def images(names: list[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [I, max views, 3, 48, 48] zero-padded as the processor pads them, image_sizes [I, 2])."""
    sizes = torch.tensor([SIZES[n] for n in names])
    count = max(views(SIZES[n]) for n in names)
    pixels = torch.zeros(len(names), count, 3, VIEW, VIEW)
    generator = torch.Generator().manual_seed(seed)
    for i, name in enumerate(names):
        n = views(SIZES[name])
        pixels[i, :n] = torch.randn(n, 3, VIEW, VIEW, generator=generator)
    return pixels, sizes


def stock_lengths(model: LlavaNextForConditionalGeneration, names: list[str]) -> list[int]:
    """Image placeholders per image as stock LLaVA-NeXT packs them (thumbnail + unpadded crops + newlines)."""
    pixels, sizes = images(names)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True).pooler_output
    return [f.shape[0] for f in packed]


def prompt(text_before: list[int], text_after: list[int], per_image: list[int]) -> list[int]:
    return [BOS, *text_before, *(t for n in per_image for t in [IMAGE_TOKEN] * n), *text_after]
