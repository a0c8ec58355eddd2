"""ToMe for diffusion transformers, ToMeSD-style (Bolya & Hoffman, arXiv 2303.17604)."""

from .method import ToMeDiT, ToMeDiTConfig

__all__ = ["ToMeDiT", "ToMeDiTConfig"]
