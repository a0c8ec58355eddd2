"""Model adapters. Importing this package registers them."""

from . import llava, qwen_vl, vit  # noqa: F401
