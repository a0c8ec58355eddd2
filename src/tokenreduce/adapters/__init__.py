"""Model adapters. Importing this package registers them."""

from . import vit  # noqa: F401
