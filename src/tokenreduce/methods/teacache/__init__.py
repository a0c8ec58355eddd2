"""TeaCache: Timestep Embedding Aware Cache (Liu et al., CVPR 2025, arXiv 2411.19108)."""

from .method import TeaCache, TeaCacheConfig

__all__ = ["TeaCache", "TeaCacheConfig"]
