"""Diffusion transformers: run state, the caching-method base and the methods built on it.

Importing this package registers the diffusers adapters (DiT, PixArt, Flux, SD3
and their pipelines) and the caching methods, without importing diffusers.

    import tokenreduce as tr
    from tokenreduce.diffusion import ToCaConfig
    with tr.apply(pipe, ToCaConfig(preset="pixart")) as handle:
        image = pipe(prompt).images[0]
    handle.stats()  # steps, full / partial steps, refreshed tokens, cache bytes
"""

from ..adapters import dit as _dit  # noqa: F401  (registers the adapters)
# Registration order is the order of ``tr.list_methods()`` and of the generated docs table.
from ..methods.fora import FORAConfig
from ..methods.toca import ToCaConfig
from ..methods.duca import DuCaConfig
from ..methods.teacache import TeaCacheConfig
from ..methods.first_block_cache import FirstBlockCacheConfig
from ..methods.taylorseer import TaylorSeerConfig
from ..methods.delta_dit import DeltaDiTConfig
from ..methods.tome_dit import ToMeDiTConfig

__all__ = [
    "DeltaDiTConfig", "DuCaConfig", "FORAConfig", "FirstBlockCacheConfig", "TaylorSeerConfig", "TeaCacheConfig", "ToCaConfig", "ToMeDiTConfig",
]
