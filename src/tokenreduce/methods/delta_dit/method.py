"""Delta-DiT: cache the increment of a block range and re-add it on skipped steps (METHODS.md D3).

Delta-Cache (arXiv 2406.01125, sec. 3.2) stores, at a full step, the change a
contiguous range of blocks makes (range output - range input) and, on the steps
in between, adds it to the range's new input instead of running the range.
Stage-adaptive (sec. 3.3): before the ``boundary`` (a fraction of the steps,
the "outline" stage) the *rear* ``blocks`` blocks are cached, after it (the
"detail" stage) the *front* ones. Both streams (image, and text where the blocks
carry one) get their own increment. Full steps every ``interval`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...config import ReductionConfig, check_range
from ...diffusion.method import BlockCall, DiffusionMethod, check_int, every
from ...diffusion.state import DiffusionRun
from ...errors import ConfigError
from ...registry import register_method


@dataclass(frozen=True, kw_only=True)
class DeltaDiTConfig(ReductionConfig):
    """interval: a full step every N steps (1 = no caching); blocks: cached range length (None = half
    the stack); boundary: fraction of the steps after which the front instead of the rear range is cached;
    num_steps: for a bare transformer (pipelines: read from the scheduler)."""

    method = "delta_dit"
    interval: int = 3
    blocks: int | None = None
    boundary: float = 0.5
    num_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int(self, "interval", 1)
        check_int(self, "blocks", 1)
        check_int(self, "num_steps", 1)
        check_range(self, "boundary", 0.0, 1.0)


def _plus(value: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor | None:
    return value if value is None or delta is None else value + delta


def _minus(value: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None or base is None else value - base


@register_method(DeltaDiTConfig)
class DeltaDiT(DiffusionMethod):
    description = "Delta-DiT: re-add the cached increment of the rear (early steps) or front (late steps) blocks"
    level = "block"

    def __init__(self, config: DeltaDiTConfig, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        total = facts["num_layers"]
        self.length = config.blocks if config.blocks is not None else total // 2
        if self.length > total:
            raise ConfigError(f"DeltaDiTConfig: blocks={self.length} but {facts['model_class']} has {total} blocks; use 1..{total}")
        self.ranges = {"front": range(0, self.length), "rear": range(total - self.length, total)}

    def needs_num_steps(self) -> bool:
        return self.config.interval > 1 and 0.0 < self.config.boundary < 1.0

    def begin(self, run: DiffusionRun) -> None:
        call, store = run.call, run.store
        store["full"] = every(call.step, self.config.interval) or ("delta", "front") not in store
        outline = call.num_steps is None or call.step < self.config.boundary * call.num_steps
        store["cached"] = self.ranges["rear" if outline else "front"]
        run.count("full_steps" if store["full"] else "partial_steps")

    def block(self, run: DiffusionRun, call: BlockCall) -> Any:
        store, layer = run.store, call.block.layer
        if store["full"]:
            for name, span in self.ranges.items():
                if layer == span.start:
                    store[("input", name)] = call.streams
            out = call.run()
            for name, span in self.ranges.items():
                if layer == span.stop - 1:
                    (h_in, e_in), (h, e) = store.pop(("input", name)), call.unpack(out)
                    store[("delta", name)] = (h - h_in, _minus(e, e_in))
            return out
        span = store["cached"]
        if layer not in span:
            return call.run()
        if layer == span.start:
            store["range_input"] = call.streams
        if layer < span.stop - 1:
            return call.pack(*call.streams)
        (h_in, e_in), name = store["range_input"], "rear" if span == self.ranges["rear"] else "front"
        dh, de = store[("delta", name)]
        return call.pack(h_in + dh, _plus(e_in, de))
