"""Tiny Qwen2-VL / Qwen2.5-VL models of the real classes, built in-process, >= 144 merged image tokens per image.

Images are given as the processor would: ``pixel_values`` [patches, C * T * P * P] with
the patches of every 2x2 merge group consecutive, and ``image_grid_thw`` (1, h, w) in
patches per image. Prompts carry ``mm_token_type_ids`` (1 on image placeholders), which
the models need when built without the processor (DESIGN.md sec. 8).
"""

from __future__ import annotations

import copy

import torch
import vlm_fixtures
from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
)

PAD, BOS, VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = 0, 1, 2, 3, 5, 6
PATCH, TEMPORAL, MERGE = 4, 2, 2
SQUARE, WIDE = (24, 24), (24, 32)  # patch grids: 12 x 12 = 144 and 12 x 16 = 192 merged tokens
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)


def _text(layers: int) -> dict:
    return {**TEXT, "num_hidden_layers": layers}


def _build(model_cls: type, config) -> torch.nn.Module:
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(copy.deepcopy(config)).eval()


def qwen2_vl(layers: int = 2) -> Qwen2VLForConditionalGeneration:
    """``layers``: decoder layers of the language model (in-LLM cuts need layers before and after them)."""
    vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=PATCH,
                  temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE)
    return _build(Qwen2VLForConditionalGeneration, Qwen2VLConfig(vision_config=vision, text_config=_text(layers), **TOKENS))


def qwen2_5_vl(layers: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """Block 1 attends over the whole image; blocks 0 and 2 in 4 x 4 merged-token windows (window_size 32 px).

    ``layers``: decoder layers of the language model.
    """
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, temporal_patch_size=TEMPORAL,
                  spatial_merge_size=MERGE, window_size=32, out_hidden_size=32, fullatt_block_indexes=[1])
    return _build(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(vision_config=vision, text_config=_text(layers), **TOKENS))


def merged_tokens(grid: tuple[int, int]) -> int:
    return grid[0] * grid[1] // MERGE**2


def prompt(text_before: list[int], text_after: list[int], grids: list[tuple[int, int]]) -> list[int]:
    images = [t for g in grids for t in (VISION_START, *[IMAGE_TOKEN] * merged_tokens(g), VISION_END)]
    return [BOS, *text_before, *images, *text_after]


def batch(prompts: list[list[int]], side: str = "left") -> dict[str, torch.Tensor]:
    """Pad prompts to one length: input_ids, attention_mask and mm_token_type_ids (1 on image, 2 on video placeholders)."""
    ids, mask = vlm_fixtures.batch(prompts, side)  # same PAD id
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()}


def images(grids: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixel patches and their grids, as the processor lays them out."""
    patches = sum(h * w for h, w in grids)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=generator)
    return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}


def video(frames: int, grid: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixel patches of one video of ``frames`` temporal patches, and its grid (frames, h, w)."""
    h, w = grid
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(frames * h * w, 3 * TEMPORAL * PATCH * PATCH, generator=generator)
    return {"pixel_values_videos": pixel_values, "video_grid_thw": torch.tensor([[frames, h, w]])}
