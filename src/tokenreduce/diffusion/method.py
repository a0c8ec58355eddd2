"""What a diffusion caching method is: a config, a level it acts at, and a few hooks.

METHODS.md D0 splits every caching method into a *scope* (whole stack, block
range, module, token subset), an *indicator* (when to compute) and an
*estimator* (what to emit otherwise). The adapter offers two scopes:

* ``level = "unit"``: every cacheable module call of every block (self / joint
  attention, cross-attention, MLP) goes through :meth:`DiffusionMethod.unit` with a
  :class:`UnitCall`. Its ``compute(rows)`` runs the real module on all rows or on
  a subset; its output is the module output *before* the block's gate, so the
  block re-applies the current step's gate, shift and scale to whatever the
  method returns (D0, "adaLN DiTs"). FORA, ToCa, TaylorSeer, ToMe for DiT.
* ``level = "block"``: every block call goes through :meth:`DiffusionMethod.block`
  with a :class:`BlockCall` (its image / text streams in and out). First-block
  cache, TeaCache, Delta-DiT.

Methods keep their state in ``run.store`` (one dict per CFG branch, dropped at
each new generation) and count what they did with ``run.count``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import ReductionConfig
from ..errors import ConfigError
from ..methods.base import Method
from .state import DiffusionRun

Streams = tuple[torch.Tensor, torch.Tensor | None]  # (image hidden states, text hidden states or None)


@dataclass(frozen=True)
class BlockInfo:
    """Where a block sits: global index in call order, its group (``"blocks"``, Flux ``"double"`` / ``"single"``) and index in it."""

    layer: int
    group: str
    index: int
    group_size: int
    num_layers: int


@dataclass(frozen=True)
class UnitSpec:
    """One cacheable module call inside a block (declared by the adapter's table).

    kind: ``"self"`` (attention over image tokens), ``"joint"`` (attention over text +
    image tokens): output rows depend on every row, never recomputed for a subset;
    ``"cross"`` (image queries over text keys) and ``"mlp"``: row-wise, a subset of
    rows can be recomputed. stream: which tokens the rows are, ``"img"``, ``"txt"``
    or ``"joint"`` (text then image, as in Flux single-stream blocks). Each block's
    main attention is named ``"attn"``.
    """

    name: str
    path: str  # submodule of the block ("" = a computation of an adapter-owned block forward)
    kind: str
    stream: str


@dataclass
class UnitCall:
    """One call of a cacheable unit: its input rows, how to compute it, how to read its attention."""

    block: BlockInfo
    unit: UnitSpec
    x: torch.Tensor  # [B, N, C] the rows a method may select from
    compute: Callable[[torch.Tensor | None], Any]  # rows [B, k] (None = all) -> output rows, as the module returns them
    compute_on: Callable[[torch.Tensor], Any] | None  # run on other rows [B, M, C] in place of x (merged tokens), module units only
    probe: Any  # AttentionProbe for attention units whose scores a method asked for, else None
    kwargs: dict[str, Any]  # the module call's keyword arguments (masks, rotary embeddings)

    @property
    def key(self) -> tuple[int, str]:
        return (self.block.layer, self.unit.name)


@dataclass
class BlockCall:
    """One block call: its streams in, the real block, and how to return streams in the block's own format."""

    block: BlockInfo
    streams: Streams
    run: Callable[[], Any]
    pack: Callable[[torch.Tensor, torch.Tensor | None], Any]
    unpack: Callable[[Any], Streams]
    modulated: Callable[[], torch.Tensor] | None  # the block's timestep-modulated attention input (TeaCache), if known


class DiffusionMethod(Method):
    """Base of every diffusion caching method (site ``"dit"``).

    ``facts`` (from the adapter): ``family`` ("dit", "pixart", "flux", "sd3"),
    ``model_class``, ``blocks`` (list of :class:`BlockInfo`), ``units`` (unit specs
    per block), ``num_layers``. The constructor must raise :class:`ConfigError` for
    anything the model cannot do; :meth:`check_steps` runs before anything is
    attached when the step count is known (a bare transformer, or a pipeline whose
    scheduler already has timesteps) and again at the start of every generation.
    """

    sites: ClassVar[frozenset[str]] = frozenset({"dit"})
    level: ClassVar[str] = "unit"
    shares_cfg_pairs: bool = False  # ask the run to detect CFG doublings (costs one comparison per call)

    def min_steps(self) -> int:
        """Inference steps a generation needs for the schedule to make sense."""
        return 1

    def needs_num_steps(self) -> bool:
        """Whether the schedule depends on the number of inference steps."""
        return False

    def check_steps(self, num_steps: int | None) -> None:
        """Called before anything is attached (if the step count is known) and at the start of each generation."""
        name = type(self.config).__name__
        if num_steps is None:
            if self.needs_num_steps():
                raise ConfigError(
                    f"{name}: this schedule depends on the number of inference steps; apply it to the pipeline "
                    "(its scheduler is read at each generation) or pass num_steps=... for a bare transformer"
                )
            return
        if num_steps < self.min_steps():
            raise ConfigError(
                f"{name}: the scheduler runs {num_steps} inference steps but this schedule needs at least "
                f"{self.min_steps()}; use more steps or a shorter warm-up / interval"
            )

    def wants_probe(self, unit: UnitSpec) -> bool:
        """Whether the adapter should capture q / k of this attention unit."""
        return False

    def begin(self, run: DiffusionRun) -> None:
        """Called once per denoiser call, after ``run.call`` is set and before any block runs."""

    def unit(self, run: DiffusionRun, call: UnitCall) -> Any:
        return call.compute(None)

    def block(self, run: DiffusionRun, call: BlockCall) -> Any:
        return call.run()


def every(step: int, interval: int, warmup: int = 1) -> bool:
    """Static full-compute schedule: the first ``warmup`` steps, then every ``interval``-th step after them.

    warmup 1 gives steps 0, N, 2N, ... (FORA, D2); warmup 3 with N = 4 gives
    0, 1, 2, 6, 10, ... (ToCa / TaylorSeer on Flux, D1.6).
    """
    return step < warmup or (step - warmup + 1) % interval == 0


def unit_generator(seed: int, run: DiffusionRun, call: UnitCall) -> torch.Generator:
    """A CPU generator seeded by (seed, step, layer, unit): random choices that repeat across generations and
    do not depend on the batch (every sample of a call draws the same numbers, so batch == one by one)."""
    key = f"{seed}/{run.call.step}/{call.block.layer}/{call.unit.name}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


def check_int(config: ReductionConfig, name: str, low: int) -> None:
    """An int field >= low (None allowed for optional fields)."""
    value = getattr(config, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{type(config).__name__}: {name}={value!r} is invalid; expected an int >= {low}")


def cached_tail(run: DiffusionRun, call: BlockCall, start: int, skip: torch.Tensor | None = None) -> Any:
    """Skip blocks ``start .. L-1`` for the samples in ``skip`` and add their cached residual (D1 scope).

    Call it for every block ``>= start``; at block ``start`` pass ``skip`` ([B] bool,
    the method's per-sample decision). Skipped samples get
    ``input of block start + residual stored at their last computed step``
    (FirstBlockCache, TeaCache); the others are computed and refresh the residual.
    When every sample skips, no block runs; otherwise the batch runs and the skipped
    samples' outputs are replaced, so each sample's result does not depend on its
    batch neighbours (a skip decision shared by the batch would, METHODS.md D0).
    Only the image stream is cached: no transformer here reads the text stream
    after its last block.
    """
    store, layer, last = run.store, call.block.layer, call.block.num_layers - 1
    if layer == start:
        store["tail_skip"], store["tail_in"] = skip, call.streams[0]
        run.count("skipped_samples", int(skip.sum()))
        run.count("partial_steps" if bool(skip.any()) else "full_steps")
    skip = store["tail_skip"]
    everyone = bool(skip.all())
    if layer < last:
        return call.pack(*call.streams) if everyone else call.run()
    start_input = store["tail_in"]
    if everyone:
        return call.pack(start_input + store["tail_residual"], call.streams[1])
    hidden, text = call.unpack(call.run())
    residual = hidden - start_input
    if bool(skip.any()):
        mask = skip.view(-1, *([1] * (hidden.dim() - 1)))
        hidden = torch.where(mask, start_input + store["tail_residual"], hidden)
        residual = torch.where(mask, store["tail_residual"], residual)
    store["tail_residual"] = residual
    return call.pack(hidden, text)
