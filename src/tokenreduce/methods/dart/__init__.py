"""DART: keep the visual tokens least duplicated by a few pivots (Wen et al., arXiv 2502.11494)."""

from .method import DART, DARTConfig

__all__ = ["DART", "DARTConfig"]
