"""The merge slot: run a pre-norm transformer block in two halves with a reduction between them.

ToMe, EViT and FiCoCo-V act after a block's attention and before its MLP, so the
MLP already runs on fewer tokens (METHODS.md hook H1). This module owns that
block forward for any architecture an adapter describes with a :class:`BlockSeam`;
it knows nothing about module names. Per forward pass it carries the token
bookkeeping (sizes for proportional attention, original indices for grid-aware
methods) from block to block. The contract test "zero strength == original
forward, bit for bit" guards every adapter's seam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .ops.merge import TokenPlan, apply_plan, size_bias
from .ops.scoring import importance

OVERHEAD_LABEL = "tokenreduce.reduce"  # profiler range around scoring + merging, for overhead measurements


@dataclass
class QKCapture:
    """Holds the q and k [B, H, N, d] a block's attention computed in the current forward."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scores: Callable[[], torch.Tensor] | None = None  # an adapter's own importance probe (see Site.scores)

    def clear(self) -> None:
        self.q = self.k = self.scores = None


@dataclass(frozen=True)
class BlockSeam:
    """How to run one block in halves; provided by an adapter.

    attend(x, mask, kwargs) -> x after the attention residual;
    feed_forward(x) -> x after the MLP residual;
    split_args(args, kwargs) -> (mask, remaining attention kwargs) from the block's call;
    install_capture(capture) -> hook handles that fill ``capture`` with q and k.
    """

    module: nn.Module
    attend: Callable[[torch.Tensor, torch.Tensor | None, dict[str, Any]], torch.Tensor]
    feed_forward: Callable[[torch.Tensor], torch.Tensor]
    split_args: Callable[[tuple, dict], tuple[torch.Tensor | None, dict[str, Any]]]
    install_capture: Callable[[QKCapture], list[Any]]
    scale: float


@dataclass(frozen=True)
class Site:
    """Everything a method may read at one merge slot (one block, one forward)."""

    x: torch.Tensor  # [B, N, C] hidden states after the attention residual
    q: torch.Tensor | None  # [B, H, N, d]; None where no attention precedes the site (projector output)
    k: torch.Tensor | None  # [B, H, N, d]
    scale: float
    positions: torch.Tensor  # [B, N] original token index, -1 for tokens created by a reduction
    sizes: torch.Tensor | None  # [B, N] tokens represented by each token, None = all 1
    protected: int  # leading tokens never discarded ([CLS], registers)
    has_cls: bool
    grid: tuple[int, int]  # original patch grid (rows, cols)
    layer: int
    remove: int  # net tokens this step must remove
    text: torch.Tensor | None = None  # [B, T, C'] input embeddings of each image's prompt (VLMs; None elsewhere)
    text_mask: torch.Tensor | None = None  # [B, T] bool, the text tokens of ``text`` (not images, not padding)
    # Importance probe [B, N] supplied by the adapter where the site's tokens have no q/k of their own
    # (Qwen2-VL's merged tokens: the attention their 2x2 patches receive, METHODS.md B1 pitfalls);
    # called only by methods that rank by importance, so the others do not pay for it.
    scores: Callable[[], torch.Tensor] | None = None

    def importance(self) -> torch.Tensor:
        """Token importance [B, N]: the adapter's ``scores`` probe if given, else [CLS] attention or attention received from q/k."""
        return self.scores() if self.scores is not None else importance(self.q, self.k, self.scale, self.has_cls)


@dataclass(frozen=True)
class ViewsSite:
    """One multi-view image (AnyRes: a thumbnail and a grid of crops) at the point its views are packed for the LLM.

    A method returns the kept patch indices of every view. Views share one patch
    grid; the crops tile a canvas of ``crop_grid`` views, of which only
    ``canvas`` survives unpadding.
    """

    features: torch.Tensor  # [V, P, C] patch features of every view (view 0 = thumbnail, then crops row-major)
    q: torch.Tensor | None  # [V, H, N, d] score layer queries, N = protected + P; None if the model has no probe
    k: torch.Tensor | None
    scale: float
    has_cls: bool
    grid: tuple[int, int]  # patch grid of one view (rows, cols)
    crop_grid: tuple[int, int]  # crops (rows, cols); (0, 0) for a single view
    canvas: torch.Tensor  # [Hv, Wv] long: crop * P + patch of each canvas token left after unpadding (empty: single view)


@dataclass
class TowerRun:
    """Per-forward token bookkeeping plus what stats() reports about the last forward."""

    protected: int
    has_cls: bool
    grid_for: Callable[[int], tuple[int, int]]
    method: Any
    positions: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    grid: tuple[int, int] = (0, 0)
    schedule: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    tokens_in: int = 0
    forwards: int = 0
    text: torch.Tensor | None = None  # set by a VLM adapter for the coming forward, see Site.text
    text_mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, N] bool after an adaptive-count step (TokenPlan.valid), else None

    def begin(self, x: torch.Tensor) -> None:
        """Start a forward pass: fresh positions, unit sizes, this input's schedule."""
        batch, n, _ = x.shape
        self.positions = torch.arange(n, device=x.device).expand(batch, n)
        self.sizes = self.bias = self.valid = None
        self.grid = self.grid_for(n - self.protected)
        self.schedule = self.method.schedule(n - self.protected)
        self.tokens_in = n
        self.tokens_per_layer = []
        self.forwards += 1

    def stats(self) -> dict[str, Any]:
        """Tokens entering and leaving each layer in the last forward, and the schedule."""
        return {
            "forwards": self.forwards,
            "tokens_in": self.tokens_in,
            "tokens_per_layer": list(self.tokens_per_layer),
            "tokens_out": self.tokens_per_layer[-1] if self.tokens_per_layer else self.tokens_in,
            "removed_per_layer": list(self.schedule),
        }

    def reset(self) -> None:
        self.forwards = 0
        self.tokens_per_layer = []

    def surviving_patches(self) -> torch.Tensor | None:
        """[B, P] bool over the original patch grid (raster order): patches whose token survived the last forward.

        A merged-away patch counts as discarded (its content lives on in its target).
        """
        if self.positions is None:
            return None
        batch = self.positions.shape[0]
        patches = self.grid[0] * self.grid[1]
        index = self.positions - self.protected
        valid = index >= 0
        alive = torch.zeros(batch, patches + 1, dtype=torch.bool, device=index.device)
        alive.scatter_(1, torch.where(valid, index, patches), True)
        return alive[:, :patches]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """log(size) per key for proportional attention, computed once per reduction step."""
        return None if self.bias is None else self.bias.to(dtype)

    def reduce(self, layer: int, x: torch.Tensor, capture: QKCapture, scale: float) -> torch.Tensor:
        """Apply this layer's step of the schedule to x (q and k of the layer's attention in ``capture``)."""
        remove = self.schedule[layer] if layer < len(self.schedule) else 0
        if remove:
            with torch.profiler.record_function(OVERHEAD_LABEL):
                x = self._reduce(layer, remove, x, capture, scale)
        capture.clear()
        self.tokens_per_layer.append(x.shape[1])
        return x

    def _reduce(self, layer: int, remove: int, x: torch.Tensor, capture: QKCapture, scale: float) -> torch.Tensor:
        site = Site(
            x=x, q=capture.q, k=capture.k, scale=scale, positions=self.positions, sizes=self.sizes,
            protected=self.protected, has_cls=self.has_cls, grid=self.grid, layer=layer, remove=remove, scores=capture.scores,
            text=self.text, text_mask=self.text_mask,
        )
        return self._apply(self.method.plan(site), x)

    def _apply(self, plan: TokenPlan, x: torch.Tensor) -> torch.Tensor:
        x, sizes = apply_plan(plan, x, self.sizes)
        self.sizes = sizes if self.method.track_sizes else None
        self.bias = size_bias(sizes, x.dtype) if self.method.prop_attn else None
        positions = torch.gather(self.positions, 1, plan.keep)
        if plan.new_tokens:
            extra = plan.new_positions if plan.new_positions is not None else positions.new_full((x.shape[0], plan.new_tokens), -1)
            positions = torch.cat([positions, extra], dim=1)
        self.valid = plan.valid
        self.positions = positions if plan.valid is None else positions.masked_fill(~plan.valid, -1)
        return x


def own_block_forwards(seams: list[BlockSeam], run: TowerRun) -> list[Callable[[], None]]:
    """Replace each block's forward (instance attribute) with the two-half forward; return undo actions."""
    undo: list[Callable[[], None]] = []
    for layer, seam in enumerate(seams):
        capture = QKCapture()
        handles = seam.install_capture(capture)
        undo.extend(h.remove for h in handles)
        undo.append(replace_forward(seam.module, _two_half_forward(layer, seam, capture, run)))
    return undo


def _two_half_forward(layer: int, seam: BlockSeam, capture: QKCapture, run: TowerRun) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask, attn_kwargs = seam.split_args(args, kwargs)
        if layer == 0:
            run.begin(x)
        if mask is not None and x.shape[1] != run.tokens_in:
            raise ValueError("tokenreduce: an attention mask over the original tokens cannot follow reduced tokens; call the vision model without an attention mask")
        bias = run.attention_bias(x.dtype)
        if bias is not None:
            mask = bias if mask is None else mask + bias
        x = seam.attend(x, mask, attn_kwargs)
        x = run.reduce(layer, x, capture, seam.scale)
        return seam.feed_forward(x)

    return forward


def reduce_module_output(module: nn.Module, layer: int, capture: QKCapture, scale: float, run: TowerRun) -> Callable[[], None]:
    """Reduce the tokens a module outputs (H2: a vision block; H3: the projector); return the undo action.

    The hook runs before any hook registered earlier (e.g. transformers' hidden-state
    recorders), so whatever reads the block's output sees the reduced tokens.
    """

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        run.begin(output)
        return run.reduce(layer, output, capture, scale)

    return module.register_forward_hook(hook, prepend=True).remove


def replace_forward(module: nn.Module, forward: Callable[..., Any], name: str = "forward") -> Callable[[], None]:
    """Shadow the method ``name`` of ``module`` with an instance attribute; the returned action restores the original exactly."""
    had_own = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, forward)

    def restore() -> None:
        if had_own:
            setattr(module, name, previous)
        else:
            delattr(module, name)

    return restore
