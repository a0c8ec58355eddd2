"""TaylorSeer: forecasting features with Taylor series (Liu et al., ICCV 2025, arXiv 2503.06923)."""

from .method import TaylorSeer, TaylorSeerConfig

__all__ = ["TaylorSeer", "TaylorSeerConfig"]
