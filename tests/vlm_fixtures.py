"""Tiny multimodal LLMs of the real classes with >= 144 image tokens per image, built in-process."""

from __future__ import annotations

import copy

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokenreduce as tr

IMAGE_TOKEN, PAD, BOS = 5, 0, 1
IMAGE, PATCH = 48, 4
IMAGE_TOKENS = (IMAGE // PATCH) ** 2  # 144


def llava(feature_layer: int = -2, strategy: str = "default") -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_channels=3, projection_dim=32)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=PAD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy)
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(copy.deepcopy(config)).eval()


def placeholders(model: LlavaForConditionalGeneration) -> int:
    """Image placeholders per image, as the processor expands them ([CLS] included with the "full" strategy)."""
    return IMAGE_TOKENS + (model.config.vision_feature_select_strategy == "full")


def prompt(text_before: list[int], text_after: list[int], images: int = 1, per_image: int = IMAGE_TOKENS) -> list[int]:
    return [BOS, *text_before, *([IMAGE_TOKEN] * per_image * images), *text_after]


def batch(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad prompts to one length: (input_ids, attention_mask)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    return ids, mask


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def assert_text_only_prompt_is_a_no_op(model: torch.nn.Module, config, inputs: dict[str, torch.Tensor]) -> None:
    """A prompt without an image: the method leaves the logits bit-exact and says so in stats() (every VLM family)."""
    with torch.no_grad():
        expected = model(**inputs).logits
    with tr.apply(model, config) as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        stats = handle.stats()
    assert torch.equal(got, expected)
    assert stats["images"] == 0 and "no image" in stats["note"]


def logits_and_tokens(
    model: torch.nn.Module, prompts: list[list[int]], pixels: torch.Tensor | dict[str, torch.Tensor], side: str = "left",
    count_positions: bool = False, **generate,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward and 4 greedy tokens of the padded batch of ``prompts``.

    ``pixels``: the images' pixel values, or all the model's image inputs by keyword
    (LLaVA-NeXT's ``pixel_values`` and ``image_sizes``; empty for prompts without images).

    ``count_positions``: the forward gets position ids that skip left padding, as ``generate`` computes them
    (methods whose scores depend on absolute positions, e.g. DART's key norms after RoPE, need it for a
    padded sample to match its unpadded run); otherwise the model counts columns itself.
    """
    ids, mask = batch(prompts, side)
    positions = {"position_ids": (mask.cumsum(dim=1) - 1).clamp_min(0)} if count_positions else {}
    images = pixels if isinstance(pixels, dict) else {"pixel_values": pixels}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **images, **positions).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, **images, max_new_tokens=4, do_sample=False,
                                suppress_tokens=[IMAGE_TOKEN], **generate)
    return logits, tokens[:, ids.shape[1]:]


def generate_with_logits(model, ids, mask, **inputs):
    """Greedy new tokens and the logits of every step (the tokens alone barely depend on positions in a random model)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             suppress_tokens=[IMAGE_TOKEN], output_logits=True, return_dict_in_generate=True, **inputs)
    return out.sequences[:, 0 if ids is None else ids.shape[1]:], torch.stack(out.logits, dim=1)
