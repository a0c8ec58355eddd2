"""Baselines that keep every other method honest (METHODS.md A4): random, uniform stride, spatial pooling."""

from .method import Pooling, PoolingConfig, RandomPrune, RandomConfig, UniformConfig, UniformPrune

__all__ = ["Pooling", "PoolingConfig", "RandomConfig", "RandomPrune", "UniformConfig", "UniformPrune"]
