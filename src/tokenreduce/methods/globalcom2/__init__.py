"""GlobalCom2: thumbnail-guided compression of AnyRes crops (Liu et al., arXiv 2501.05179)."""

from .method import GlobalCom2, GlobalCom2Config

__all__ = ["GlobalCom2", "GlobalCom2Config"]
