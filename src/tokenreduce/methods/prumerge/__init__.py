"""LLaVA-PruMerge and PruMerge+: adaptive [CLS]-attention outliers, merged with their key neighbours (Shang et al., ICCV 2025, arXiv 2403.15388)."""

from .method import PruMerge, PruMergeConfig, PruMergePlus, PruMergePlusConfig

__all__ = ["PruMerge", "PruMergeConfig", "PruMergePlus", "PruMergePlusConfig"]
