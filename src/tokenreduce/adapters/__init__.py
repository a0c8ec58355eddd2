"""Model adapters. Importing this package registers them."""

from . import llava, llava_next, vit  # noqa: F401
