"""SparseVLM: text-rater-guided visual token sparsification inside the LLM (Zhang et al., ICML 2025, arXiv 2410.04417)."""

from .method import SparseVLM, SparseVLMConfig

__all__ = ["SparseVLM", "SparseVLMConfig"]
