"""Every method, one folder each. Importing this package registers them (one line per method)."""

from .tome import ToMeConfig
from .evit import EViTConfig
from .ficoco import FiCoCoVConfig
from .baselines import PoolingConfig, RandomConfig, UniformConfig

__all__ = ["EViTConfig", "FiCoCoVConfig", "PoolingConfig", "RandomConfig", "ToMeConfig", "UniformConfig"]
