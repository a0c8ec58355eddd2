"""tokenreduce: training-free token reduction as a one-line switch, measured side by side.

    import tokenreduce as tr
    handle = tr.apply(model, tr.ToMeConfig(r=8))
    ...
    handle.remove()
"""

from . import adapters as _adapters  # noqa: F401  (registers adapters)
from .api import Handle, apply, list_methods, remove, supported
from .config import config_from_dict
from .errors import AlreadyAppliedError, ConfigError, TokenReduceError, UnsupportedModelError
from .diffusion import (
    DeltaDiTConfig, DuCaConfig, FirstBlockCacheConfig, FORAConfig, TaylorSeerConfig, TeaCacheConfig, ToCaConfig, ToMeDiTConfig,
)
from .methods import (
    CDPrunerConfig, DARTConfig, DivPruneConfig, EViTConfig, FastVConfig, FasterVLMConfig, FiCoCoVConfig, GlobalCom2Config, PDropConfig, PoolingConfig, PruMergeConfig, PruMergePlusConfig,
    RandomConfig, ToMeConfig, UniformConfig, VisionZipConfig, VisPrunerConfig,
    FiCoCoLConfig, FiCoCoVLConfig, SparseVLMConfig,
)
from .registry import register_adapter, register_method

__version__ = "0.1.0"

__all__ = [
    "DeltaDiTConfig", "DuCaConfig", "FirstBlockCacheConfig", "FORAConfig", "TaylorSeerConfig", "TeaCacheConfig", "ToCaConfig",
    "ToMeDiTConfig",
    "AlreadyAppliedError", "CDPrunerConfig", "ConfigError", "DivPruneConfig", "EViTConfig", "FasterVLMConfig", "FiCoCoVConfig", "GlobalCom2Config", "Handle",
    "PoolingConfig", "PruMergeConfig", "PruMergePlusConfig", "RandomConfig", "ToMeConfig", "VisionZipConfig", "VisPrunerConfig", "TokenReduceError", "UniformConfig", "UnsupportedModelError", "apply", "config_from_dict",
    "list_methods", "register_adapter", "register_method", "remove", "supported",
    "DARTConfig", "FastVConfig", "PDropConfig",
    "FiCoCoLConfig", "FiCoCoVLConfig", "SparseVLMConfig",
]
