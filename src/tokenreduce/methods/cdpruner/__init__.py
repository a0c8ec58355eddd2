"""CDPruner: conditional-diversity token selection by DPP MAP inference (Zhang et al., NeurIPS 2025, arXiv 2506.10967)."""

from .method import CDPruner, CDPrunerConfig

__all__ = ["CDPruner", "CDPrunerConfig"]
