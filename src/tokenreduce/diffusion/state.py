"""Run state of a diffusion transformer without pipeline cooperation (DESIGN.md sec. 4.8, METHODS.md D0).

A caching method needs to know, at every denoiser call, which denoising step it
is, whether a new generation started, and which classifier-free-guidance branch
it is serving. diffusers pipelines tell none of this to the transformer (only 49
of 149 open a cache context, ANCHORS.md sec. 2.1), so tokenreduce reads it from
the one thing every pipeline passes: the ``timestep`` argument.

* the step index advances when the timestep changes in the sampling direction;
* a new generation starts when it jumps back (or the latent shape changes, or
  ``handle.reset()`` is called);
* the same timestep seen again within one step is the next CFG branch
  (pipelines that call the transformer twice per step, cond then uncond):
  branch 0, 1, ... each with its own caches. A doubled batch ([uncond, cond] in
  diffusers, [cond, uncond] in ``DiTPipeline``) needs nothing special because
  caches are per sample; :func:`cfg_pairs` detects it for methods that share a
  selection between the two halves.

Known limit: second-order samplers that evaluate the same timestep twice
(Heun) look like sequential CFG; call ``handle.reset()`` between generations
of a single step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.cache import tensor_bytes


@dataclass
class StepClock:
    """Step index, CFG branch and generation count from successive timesteps."""

    step: int = -1
    branch: int = 0
    generations: int = 0
    last: float | None = None
    direction: int = 0
    shape: tuple[int, ...] | None = None

    def tick(self, timestep: float, shape: tuple[int, ...]) -> bool:
        """Advance for one denoiser call; returns True when this call starts a new generation."""
        new = self.last is None or shape != self.shape
        if not new:
            if timestep == self.last:
                self.branch += 1
                return False
            direction = 1 if timestep > self.last else -1
            new = self.direction != 0 and direction != self.direction
        if new:
            self.step, self.branch, self.direction, self.shape = 0, 0, 0, shape
            self.generations += 1
        else:
            self.step, self.branch, self.direction = self.step + 1, 0, direction
        self.last = timestep
        return new


def cfg_pairs(latents: torch.Tensor) -> bool:
    """True when the batch is a classifier-free-guidance doubling: two identical halves of latents."""
    half = latents.shape[0] // 2
    return latents.shape[0] % 2 == 0 and half > 0 and torch.equal(latents[:half], latents[half:])


@dataclass(frozen=True)
class Call:
    """One denoiser call as the methods see it."""

    step: int
    branch: int
    num_steps: int | None  # None: unknown (bare transformer without ``num_steps``)
    grid: tuple[int, int]  # image token grid (rows, cols)
    batch: int
    pairs: bool  # the batch is a CFG doubling (halves share selections where a method says so)
    new_generation: bool


@dataclass
class DiffusionRun:
    """Per-handle state: the clock, one store per CFG branch, counters for ``stats()``.

    ``store`` is the current branch's dict of caches and schedule state; methods
    own its keys. ``counters`` are totals since ``apply`` or ``reset``.
    """

    num_steps: Callable[[], int | None]
    check_steps: Callable[[int | None], None]
    clock: StepClock = field(default_factory=StepClock)
    branches: dict[int, dict[Any, Any]] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    call: Call | None = None
    forwards: int = 0

    def begin(self, timestep: float, latents: torch.Tensor, grid: tuple[int, int], want_pairs: bool) -> Call:
        """Start a denoiser call: advance the clock, drop last generation's caches when a new one starts."""
        new = self.clock.tick(timestep, tuple(latents.shape))
        num_steps = self.num_steps()
        if new:
            self.check_steps(num_steps)
            self.branches.clear()
        self.forwards += 1
        self.call = Call(
            step=self.clock.step, branch=self.clock.branch, num_steps=num_steps, grid=grid, batch=latents.shape[0],
            pairs=want_pairs and cfg_pairs(latents), new_generation=new,
        )
        return self.call

    @property
    def store(self) -> dict[Any, Any]:
        """The current CFG branch's store."""
        return self.branches.setdefault(self.call.branch, {})

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def reset(self) -> None:
        """Forget caches, the step clock and counters; the next call starts a new generation."""
        self.clock = StepClock()
        self.branches.clear()
        self.counters.clear()
        self.call = None
        self.forwards = 0

    def stats(self) -> dict[str, Any]:
        """Totals since apply / reset, plus the current caches' size.

        ``flops_full`` is what the transformer blocks' cacheable units (attention,
        cross-attention, MLP) would cost uncached and ``flops_computed`` what was
        actually computed (recomputed rows, blocks run, score probes), both analytic
        FLOPs (2 x MACs, METHODS.md E2) counted by the adapter call by call, over
        every generation since apply / reset; ``flops_ratio`` = computed / full
        (1 / ratio is the ideal speed-up of the blocks).
        """
        counters = dict(self.counters)
        full = counters.get("flops_full", 0)
        return {
            "forwards": self.forwards,
            "generations": self.clock.generations,
            "steps": self.clock.step + 1,
            "cfg_branches": len(self.branches),
            "cache_bytes": tensor_bytes(self.branches),
            **counters,
            "flops_ratio": counters.get("flops_computed", 0) / full if full else None,
        }
