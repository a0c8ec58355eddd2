"""Every method, one folder each. Importing this package registers them (one line per method)."""

from .tome import ToMeConfig
from .evit import EViTConfig
from .ficoco import FiCoCoVConfig
from .baselines import PoolingConfig, RandomConfig, UniformConfig
from .fastervlm import FasterVLMConfig
from .visionzip import VisionZipConfig
from .divprune import DivPruneConfig
from .vispruner import VisPrunerConfig
from .globalcom2 import GlobalCom2Config
from .prumerge import PruMergeConfig, PruMergePlusConfig
from .cdpruner import CDPrunerConfig
from .fastv import FastVConfig
from .pdrop import PDropConfig
from .dart import DARTConfig
from .sparsevlm import SparseVLMConfig
from .ficoco.language import FiCoCoLConfig
from .ficoco.vision_language import FiCoCoVLConfig

__all__ = [
    "CDPrunerConfig", "DivPruneConfig", "EViTConfig", "FasterVLMConfig", "FiCoCoVConfig", "GlobalCom2Config", "PoolingConfig", "RandomConfig", "PruMergeConfig", "PruMergePlusConfig",
    "ToMeConfig", "UniformConfig", "VisionZipConfig", "VisPrunerConfig",
    "DARTConfig", "FastVConfig", "PDropConfig",
    "FiCoCoLConfig", "FiCoCoVLConfig", "SparseVLMConfig",
]
