"""FastV: drop the least-attended visual tokens after layer K (Chen et al., ECCV 2024, arXiv 2403.06764)."""

from .method import FastV, FastVConfig

__all__ = ["FastV", "FastVConfig"]
