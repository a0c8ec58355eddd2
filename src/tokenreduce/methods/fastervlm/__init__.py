"""FasterVLM: [CLS]-attention top-k before the LLM (Zhang et al., arXiv 2412.01818 v1)."""

from .method import FasterVLM, FasterVLMConfig

__all__ = ["FasterVLM", "FasterVLMConfig"]
