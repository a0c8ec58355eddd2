"""FORA: Fast-Forward Caching (Selvaraju et al., arXiv 2407.01425)."""

from .method import FORA, FORAConfig

__all__ = ["FORA", "FORAConfig"]
