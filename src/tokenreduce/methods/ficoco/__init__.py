"""FiCoCo: Filter, Correlate, Compress (Han, Liu et al., arXiv 2411.17686, AAAI 2026)."""

from .language import FiCoCoL, FiCoCoLConfig
from .vision import FiCoCoV, FiCoCoVConfig

__all__ = ["FiCoCoL", "FiCoCoLConfig", "FiCoCoV", "FiCoCoVConfig"]
