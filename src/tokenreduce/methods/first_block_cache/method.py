"""First-Block Cache: run block 0; if its residual barely changed, skip the rest (METHODS.md D7).

Block 0's residual (output - input) is compared, per sample, with the one
stored at that sample's last computed step by relative L1
(mean |r - r_prev| / mean |r_prev|). Below ``threshold``, blocks 1..L-1 are
skipped and their cached residual (last-block output - block-0 output) is added.
Like ParaAttention and diffusers, with no calibration; unlike them, decisions are
per sample and need no cache context from the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...config import ReductionConfig, check_range
from ...diffusion.method import BlockCall, DiffusionMethod, cached_tail, check_int
from ...diffusion.state import DiffusionRun
from ...ops.cache import relative_l1
from ...registry import register_method


@dataclass(frozen=True, kw_only=True)
class FirstBlockCacheConfig(ReductionConfig):
    """threshold: relative-L1 change of block 0's residual below which the rest is skipped
    (diffusers 0.05; ParaAttention FLUX 0.08; 0 = never skip). warmup: leading steps always computed."""

    method = "first_block_cache"
    threshold: float = 0.05
    warmup: int = 0

    def validate(self) -> None:
        super().validate()
        check_range(self, "threshold", 0.0, float("inf"))
        check_int(self, "warmup", 0)


@register_method(FirstBlockCacheConfig)
class FirstBlockCache(DiffusionMethod):
    description = "First-Block Cache: skip blocks 1..L-1 while block 0's residual changes less than a threshold"
    level = "block"

    def block(self, run: DiffusionRun, call: BlockCall) -> Any:
        if call.block.layer > 0:
            return cached_tail(run, call, start=1, skip=run.store.get("first_skip") if call.block.layer == 1 else None)
        out = call.run()
        residual = call.unpack(out)[0] - call.streams[0]
        previous = run.store.get("first_residual")
        skip = torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
        if previous is not None and run.call.step >= self.config.warmup:
            skip = relative_l1(residual, previous) < self.config.threshold
        keep_previous = skip.view(-1, 1, 1)
        run.store["first_residual"] = residual if previous is None else torch.where(keep_previous, previous, residual)
        run.store["first_skip"] = skip
        return out
