"""Model adapters. Importing this package registers them."""

from . import llava, vit  # noqa: F401
