"""Every method, one folder each. Importing this package registers them (one line per method)."""

from .tome import ToMeConfig
from .evit import EViTConfig
from .ficoco import FiCoCoVConfig
from .baselines import PoolingConfig, RandomConfig, UniformConfig
from .fastervlm import FasterVLMConfig
from .visionzip import VisionZipConfig
from .divprune import DivPruneConfig
from .vispruner import VisPrunerConfig
from .fastv import FastVConfig
from .pdrop import PDropConfig
from .dart import DARTConfig

__all__ = [
    "DivPruneConfig", "EViTConfig", "FasterVLMConfig", "FiCoCoVConfig", "PoolingConfig", "RandomConfig", "ToMeConfig",
    "UniformConfig", "VisionZipConfig", "VisPrunerConfig",
    "DARTConfig", "FastVConfig", "PDropConfig",
]
