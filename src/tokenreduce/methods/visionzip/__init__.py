"""VisionZip: dominant + contextual visual tokens (Yang et al., CVPR 2025, arXiv 2412.04467)."""

from .method import VisionZip, VisionZipConfig

__all__ = ["VisionZip", "VisionZipConfig"]
