"""Random, uniform-stride and spatial-pooling reduction at one layer (METHODS.md A4).

They need no attention scores. Each reduces once, at ``layer`` (between its
attention and MLP), to the budget. Several benchmarks find such baselines hard to
beat, so they appear next to every method in ``tokenreduce bench``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import BudgetConfig, require_one
from ...errors import ConfigError
from ...merge_slot import Site
from ...ops.grid import factor_grid, pooling_cells, stride_indices
from ...ops.matching import keep_top
from ...ops.merge import TokenPlan
from ...registry import register_method
from ..base import SingleStep


@dataclass(frozen=True, kw_only=True)
class SingleLayerConfig(BudgetConfig):
    """A budget (``keep`` or ``ratio``) applied once, at block ``layer``.

    Default layer: block 0 of a ViT classifier (between its attention and MLP); the
    feature layer's output in a VLM's vision tower (METHODS.md A4: H2).
    """

    layer: int | None = None

    def validate(self) -> None:
        super().validate()
        require_one(self, ("keep", "ratio"))
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"{type(self).__name__}: layer={self.layer!r} is invalid; a block index >= 0")


@dataclass(frozen=True, kw_only=True)
class RandomConfig(SingleLayerConfig):
    """Uniform random selection; ``seed`` makes it reproducible."""

    method = "random"
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class UniformConfig(SingleLayerConfig):
    """A regular sub-grid of patches."""

    method = "uniform"


@dataclass(frozen=True, kw_only=True)
class PoolingConfig(SingleLayerConfig):
    """2-D adaptive average pooling of the patch grid to exactly ``keep`` cells."""

    method = "pooling"


class SingleLayer(SingleStep):
    """Shared by the baselines: one reduction on the intact patch grid, in a ViT block or at a VLM's feature layer."""

    sites = frozenset({"vit", "vit_output", "merger_output"})
    site_order = ("vit_output", "merger_output", "vit")

    @staticmethod
    def kept_patches(site: Site) -> int:
        return site.x.shape[1] - site.protected - site.remove

    @staticmethod
    def with_protected(site: Site, patches: torch.Tensor) -> torch.Tensor:
        """[k] patch-grid indices -> [B, protected + k] token indices, same for every sample."""
        index = torch.cat([torch.arange(site.protected), patches + site.protected]).to(site.x.device)
        return index.expand(site.x.shape[0], -1)


@register_method(RandomConfig)
class RandomPrune(SingleLayer):
    description = "baseline: keep a uniformly random subset of patches (seeded)"

    def plan(self, site: Site) -> TokenPlan:
        # One draw per forward from a freshly seeded generator, shared by the batch:
        # a sample's result must not depend on its batch neighbours or position.
        n = site.x.shape[1]
        generator = torch.Generator().manual_seed(self.config.seed)
        scores = torch.rand(n, generator=generator).to(site.x.device).expand(site.x.shape[0], n)
        return TokenPlan(keep=keep_top(scores, self.kept_patches(site), site.protected))


@register_method(UniformConfig)
class UniformPrune(SingleLayer):
    description = "baseline: keep a regular sub-grid of patches"

    def plan(self, site: Site) -> TokenPlan:
        rows, cols = site.grid
        return TokenPlan(keep=self.with_protected(site, stride_indices(self.kept_patches(site), rows, cols)))


@register_method(PoolingConfig)
class Pooling(SingleLayer):
    description = "baseline: 2-D adaptive average pooling of the patch grid"

    def solve(self, reducible: int) -> list[int]:
        schedule = super().solve(reducible)
        kept = reducible - schedule[self.layer]
        if kept and reducible == self.facts["reducible_tokens"]:
            try:
                factor_grid(kept, *self.facts["grid"])
            except ValueError as error:
                raise ConfigError(f"PoolingConfig: {error}; choose a keep count with a factor pair that fits the grid") from None
        return schedule

    def plan(self, site: Site) -> TokenPlan:
        rows, cols = site.grid
        kept = self.kept_patches(site)
        keep = self.with_protected(site, torch.zeros(0, dtype=torch.long))
        if kept == 0:
            return TokenPlan(keep=keep)
        cells, weights = pooling_cells(kept, rows, cols)
        batch, device = site.x.shape[0], site.x.device
        src = self.with_protected(site, torch.arange(rows * cols))[:, site.protected :]
        dst = (cells + site.protected).to(device).expand(batch, -1, -1)
        # Each cell is labelled with its first (top-left) patch, so models whose LLM sees
        # the tokens' 2-D positions (Qwen-VL's M-RoPE) place the cell where it lies.
        member = weights > 0
        patch = torch.arange(rows * cols).unsqueeze(1).expand_as(cells)
        corner = torch.full((kept,), rows * cols).scatter_reduce(0, cells[member], patch[member], "amin")
        return TokenPlan(
            keep=keep, merge_src=src, merge_dst=dst, merge_weight=weights.to(device).expand(batch, -1, -1),
            new_tokens=kept, new_positions=(corner + site.protected).to(device).expand(batch, -1),
        )
