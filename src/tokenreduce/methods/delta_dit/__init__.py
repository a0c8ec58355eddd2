"""Delta-DiT: training-free acceleration tailored for diffusion transformers (Chen et al., arXiv 2406.01125)."""

from .method import DeltaDiT, DeltaDiTConfig

__all__ = ["DeltaDiT", "DeltaDiTConfig"]
