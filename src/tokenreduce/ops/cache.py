"""Feature-cache kernels for diffusion transformers (METHODS.md sec. D0-D7), written once for every caching method.

Pure tensor functions, no model knowledge. Shapes: B batch, N rows (tokens) of
one module, k rows chosen for recomputation, C channels, T text tokens.
Scores are float32; cached features keep the model's dtype.

* token-wise caches (ToCa, D1): choose rows (:func:`top_rows`, :func:`cell_bonus`),
  recompute them (:func:`tokenreduce.ops.merge.gather_tokens`) and write them back (:func:`scatter_rows`);
* scores: cross-attention entropy (ToCa s2, :func:`cross_attention_probs`, :func:`entropy`);
  attention received (s1) is :func:`tokenreduce.ops.scoring.attention_received`;
* step-level indicators (FirstBlockCache, TeaCache, D6-D7): :func:`relative_l1`, :func:`polynomial`;
* forecasts (TaylorSeer, D5): :func:`taylor_update`, :func:`taylor_forecast`;
* accounting: :func:`tensor_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .scoring import grid_cells


def scatter_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` [B, k, C] into rows [B, k] of ``cache`` [B, N, C] in place; returns ``cache``."""
    return cache.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, cache.shape[-1]), values.to(cache.dtype))


def top_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring rows of each sample, [B, N] -> [B, k] long (ToCa's ``argsort(descending)[:, :k]``)."""
    return score.argsort(dim=-1, descending=True, stable=True)[:, :k]


def cell_bonus(score: torch.Tensor, grid: tuple[int, int], cell: int, bonus: float) -> torch.Tensor:
    """ToCa s4, spatial uniformity (arXiv 2410.05317, sec. 3.3): in every ``cell x cell`` window of the
    (rows, cols) token grid the best token's score is multiplied by ``1 + bonus``.

    score: [B, rows*cols] in raster order. Windows at the right / bottom edge may be
    partial (the reference asserts a square grid divisible by the window instead).
    Ties go to the first token in raster order, like the reference's ``max``.
    """
    batch, n = score.shape
    positions = torch.arange(n, device=score.device).expand(batch, n)
    cells = grid_cells(positions, 0, grid, cell)
    num_cells = int(cells.max()) + 1
    best = score.new_full((batch, num_cells), -torch.inf).scatter_reduce(1, cells, score, "amax")
    is_best = score == torch.gather(best, 1, cells)
    first = torch.full((batch, num_cells), n, device=score.device).scatter_reduce(1, cells, positions.masked_fill(~is_best, n), "amin")
    chosen = positions == torch.gather(first, 1, cells)
    return torch.where(chosen, score * (1.0 + bonus), score)


def cross_attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Probe P5: head-mean softmax of image queries over text keys, [B, H, n, d] x [B, H, T, d] -> [B, n, T] float32.

    ``bias`` is the additive key mask the model's attention uses (broadcastable to
    [B, H, n, T], e.g. diffusers' [B, 1, T] encoder mask with -10000 on padding).
    """
    logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + (bias.float().unsqueeze(1) if bias.dim() == 3 else bias.float())
    return logits.softmax(dim=-1).mean(dim=1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """ToCa s2 (METHODS.md D1.4): H_i = -sum_k p_ik log(p_ik + 1e-7), [B, n, T] -> [B, n]."""
    return -(probs * torch.log(probs + 1e-7)).sum(dim=-1)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |current - previous| / mean |previous| (FirstBlockCache, TeaCache), [B, ...] -> [B] float32."""
    dims = tuple(range(1, current.dim()))
    diff = (current.float() - previous.float()).abs().mean(dim=dims)
    return diff / previous.float().abs().mean(dim=dims).clamp_min(1e-12)


def polynomial(coefficients: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """Horner evaluation of c0 x^n + ... + cn (numpy.poly1d order, as TeaCache ships its fits)."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def taylor_update(factors: list[torch.Tensor], value: torch.Tensor, gap: float, order: int) -> list[torch.Tensor]:
    """TaylorSeer (arXiv 2503.06923, eq. 6): finite-difference derivatives after a full step.

    ``factors`` holds [f, df/ds, d2f/ds2, ...] from the previous full step, ``gap``
    the steps since then; returns the new list (at most ``order`` + 1 terms), the
    k-th derivative being (new (k-1)-th - old (k-1)-th) / gap.
    """
    new = [value]
    for k in range(order):
        if k >= len(factors):
            break
        new.append((new[k] - factors[k]) / gap)
    return new


def taylor_forecast(factors: list[torch.Tensor], distance: float) -> torch.Tensor:
    """f(s + distance) ~ sum_k f^(k)(s) distance^k / k! (TaylorSeer eq. 7)."""
    out = factors[0]
    for k, factor in enumerate(factors[1:], start=1):
        out = out + factor * (distance**k / math.factorial(k))
    return out


def tensor_bytes(obj: Any) -> int:
    """Bytes held by every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
