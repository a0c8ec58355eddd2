"""VisPruner: important + diverse visual tokens (Zhang et al., ICCV 2025, arXiv 2412.01818)."""

from .method import VisPruner, VisPrunerConfig

__all__ = ["VisPruner", "VisPrunerConfig"]
