"""Model adapters. Importing this package registers them."""

from . import llava, llava_next, qwen_vl, vit  # noqa: F401
