"""EViT: [CLS]-attention pruning with a fused inattentive token (Liang et al., ICLR 2022, arXiv 2202.07800)."""

from .method import EViT, EViTConfig

__all__ = ["EViT", "EViTConfig"]
