"""ToCa: Token-wise Feature Caching (Zou, Liu et al., ICLR 2025, arXiv 2410.05317)."""

from .method import ToCa, ToCaConfig
from .presets import PRESETS, ToCaPreset

__all__ = ["PRESETS", "ToCa", "ToCaConfig", "ToCaPreset"]
