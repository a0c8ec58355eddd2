"""ToMe: Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461)."""

from .method import ToMe, ToMeConfig

__all__ = ["ToMe", "ToMeConfig"]
