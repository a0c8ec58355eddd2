"""FiCoCo: Filter, Correlate, Compress (Han, Liu et al., arXiv 2411.17686, AAAI 2026).

FiCoCo-V (vision encoder) is here; FiCoCo-L (LLM decoder) is in :mod:`.language`,
registered with the other in-LLM methods, and FiCoCo-VL (both) in :mod:`.vision_language`.
"""

from .vision import FiCoCoV, FiCoCoVConfig

__all__ = ["FiCoCoV", "FiCoCoVConfig"]
