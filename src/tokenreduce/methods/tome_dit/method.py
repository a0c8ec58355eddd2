"""ToMe for DiT: merge image tokens before each self-attention, unmerge after it (ToMeSD, METHODS.md D11).

ToMeSD (arXiv 2303.17604, sec. 3-4) for U-Nets, carried to DiT blocks: in every
``window x window`` cell of the image-token grid one token (random, seeded) is a
destination; the ``ratio * N`` source tokens most similar to a destination
(cosine similarity of the attention's input) are averaged into it, the
attention runs on the N - r remaining tokens, and every merged token receives
its destination's output back, so the block's shapes never change. Only
self-attention is merged (ToMeSD's ``merge_attn=True``, cross-attention and MLP
untouched); in SD3's joint attention only image tokens merge, text is
protected. Flux is not supported: its rotary positions have no merged value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...config import ReductionConfig, check_range
from ...diffusion.method import DiffusionMethod, UnitCall, check_int, unit_generator
from ...diffusion.state import DiffusionRun
from ...errors import ConfigError, UnsupportedModelError
from ...ops.merge import TokenPlan, apply_plan, complement, gather_tokens, output_index
from ...registry import register_method


@dataclass(frozen=True, kw_only=True)
class ToMeDiTConfig(ReductionConfig):
    """ratio: fraction of image tokens merged before each self-attention (ToMeSD 0.5; at most
    1 - 1/window^2); window: destination cell side (2); random_dst: pick the destination of each
    cell at random (seeded by ``seed``, the step and the block) rather than its top-left token."""

    method = "tome_dit"
    ratio: float = 0.5
    window: int = 2
    random_dst: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_range(self, "ratio", 0.0, 1.0)
        if self.ratio == 1.0:
            raise ConfigError("ToMeDiTConfig: ratio=1.0 is invalid; expected a number in [0.0, 1.0) (each window keeps a destination)")
        check_int(self, "window", 1)
        check_int(self, "seed", 0)


def window_plan(metric: torch.Tensor, grid: tuple[int, int], window: int, r: int, choice: torch.Tensor) -> TokenPlan:
    """ToMeSD's ``bipartite_soft_matching_random2d`` as a :class:`TokenPlan`.

    metric [B, N, C] in raster order over ``grid``; ``choice`` [rows // window, cols // window]
    the destination slot of each full cell. Tokens outside full cells are sources.
    The r sources with the most similar destination are folded into it with weight 1.
    """
    batch, n, _ = metric.shape
    rows, cols = grid
    cells_r, cells_c = rows // window, cols // window
    dst_row = torch.arange(cells_r, device=metric.device)[:, None] * window + choice // window
    dst_col = torch.arange(cells_c, device=metric.device)[None, :] * window + choice % window
    dst = (dst_row * cols + dst_col).flatten()
    src = complement(dst.expand(batch, -1), n)  # [B, N - D] ascending
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = gather_tokens(unit, src) @ unit[:, dst].transpose(-1, -2)  # [B, N - D, D]
    best, best_dst = scores.max(dim=-1)
    merged = best.argsort(dim=-1, descending=True, stable=True)[:, :r]
    merge_src = torch.gather(src, 1, merged)
    keep = complement(merge_src, n)
    targets = torch.gather(output_index(keep, n), 1, dst[torch.gather(best_dst, 1, merged)])
    weight = torch.ones(batch, r, 1, dtype=torch.float32, device=metric.device)
    return TokenPlan(keep=keep, merge_src=merge_src, merge_dst=targets.unsqueeze(-1), merge_weight=weight)


def unmerge_index(plan: TokenPlan, n: int) -> torch.Tensor:
    """[B, n] output slot of every original token: its own if kept, its destination's if merged."""
    return output_index(plan.keep, n).scatter_(1, plan.merge_src, plan.merge_dst[..., 0])


@register_method(ToMeDiTConfig)
class ToMeDiT(DiffusionMethod):
    description = "ToMe for DiT (ToMeSD): merge similar image tokens before self-attention, copy outputs back after"

    def __init__(self, config: ToMeDiTConfig, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        if facts["family"] == "flux":
            raise UnsupportedModelError(
                f"tome_dit cannot merge {facts['model_class']}'s tokens: its rotary positions have no merged value; "
                "supported: DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel"
            )

    def unit(self, run: DiffusionRun, call: UnitCall) -> Any:
        grid = run.call.grid
        n = call.x.shape[1]
        cells = (grid[0] // self.config.window) * (grid[1] // self.config.window)
        r = min(int(self.config.ratio * n), n - cells)
        if call.unit.kind not in ("self", "joint") or call.compute_on is None or grid[0] * grid[1] != n or r <= 0:
            return call.compute(None)
        plan = window_plan(call.x, grid, self.config.window, r, self._choice(run, call, grid))
        batch, _, channels = call.x.shape
        run.count("flops_computed", 2 * batch * (n - cells) * cells * channels)  # the sources x destinations similarity
        out = call.compute_on(apply_plan(plan, call.x)[0])
        index = unmerge_index(plan, n)
        run.count("merged_tokens", plan.merge_src.numel())
        if isinstance(out, tuple):  # SD3 joint attention: (image, text); only image tokens were merged
            return (gather_tokens(out[0], index), *out[1:])
        return gather_tokens(out, index)

    def _choice(self, run: DiffusionRun, call: UnitCall, grid: tuple[int, int]) -> torch.Tensor:
        shape = (grid[0] // self.config.window, grid[1] // self.config.window)
        if not self.config.random_dst:
            return torch.zeros(shape, dtype=torch.long, device=call.x.device)
        generator = unit_generator(self.config.seed, run, call)
        return torch.randint(self.config.window**2, shape, generator=generator).to(call.x.device)
