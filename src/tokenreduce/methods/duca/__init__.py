"""DuCa: Dual Feature Caching (Zou, Zhang et al., arXiv 2412.18911)."""

from .method import DuCa, DuCaConfig

__all__ = ["DuCa", "DuCaConfig"]
