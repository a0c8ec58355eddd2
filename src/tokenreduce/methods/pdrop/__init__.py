"""PyramidDrop: drop visual tokens in stages, a constant fraction at each boundary (Xing et al., CVPR 2025, arXiv 2410.17247)."""

from .method import PDrop, PDropConfig

__all__ = ["PDrop", "PDropConfig"]
