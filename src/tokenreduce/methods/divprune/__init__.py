"""DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025, arXiv 2503.02175)."""

from .method import DivPrune, DivPruneConfig

__all__ = ["DivPrune", "DivPruneConfig"]
