"""First-Block Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``; METHODS.md D7)."""

from .method import FirstBlockCache, FirstBlockCacheConfig

__all__ = ["FirstBlockCache", "FirstBlockCacheConfig"]
