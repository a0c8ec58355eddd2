"""Grid geometry for the spatial baselines (METHODS.md A4): sub-grids and pooling cells.

All functions work on one (rows, cols) patch grid in raster order and return
indices into that grid; they are deterministic and independent of the batch.
"""

from __future__ import annotations

import math

import torch


def factor_grid(k: int, rows: int, cols: int) -> tuple[int, int]:
    """The (r', c') with r' * c' = k, r' <= rows, c' <= cols, closest in aspect ratio to rows / cols."""
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= rows and k // a <= cols]
    if not pairs:
        raise ValueError(f"cannot pool a {rows}x{cols} grid to exactly {k} cells")
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(rows / cols)))


def stride_indices(k: int, rows: int, cols: int) -> torch.Tensor:
    """Uniform stride baseline: a regular sub-grid of about k patches, topped up or trimmed in raster order to k.

    Rows round(linspace(0, rows-1, r')) x columns round(linspace(0, cols-1, c')) with
    r' / c' close to rows / cols. Returns [k] ascending raster indices.
    """
    sub_rows = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    sub_cols = max(1, min(cols, round(k / sub_rows)))
    r = torch.linspace(0, rows - 1, sub_rows).round().long().unique()
    c = torch.linspace(0, cols - 1, sub_cols).round().long().unique()
    chosen = (r[:, None] * cols + c[None, :]).flatten()[:k]
    if chosen.numel() < k:
        mask = torch.ones(rows * cols, dtype=torch.bool)
        mask[chosen] = False
        chosen = torch.cat([chosen, mask.nonzero()[: k - chosen.numel(), 0]])
    return chosen.sort().values


def pooling_cells(k: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling to exactly k cells, as a membership table.

    Cell i of an axis of length n pooled to m covers [floor(i n / m), ceil((i+1) n / m)),
    the same windows as ``torch.nn.functional.adaptive_avg_pool2d``. A patch may fall
    in up to 2 cells per axis. Returns (cells [rows*cols, min(4, k)] cell index of each
    patch's memberships, weights [rows*cols, min(4, k)] with 1 for a membership, 0 for padding).
    """
    out_rows, out_cols = factor_grid(k, rows, cols)
    row_member = _axis_membership(rows, out_rows)  # [out_rows, rows]
    col_member = _axis_membership(cols, out_cols)
    member = (row_member[:, None, :, None] & col_member[None, :, None, :]).reshape(out_rows * out_cols, rows * cols)
    weights, cells = member.T.float().topk(min(4, k), dim=-1)
    return cells, weights


def _axis_membership(n: int, m: int) -> torch.Tensor:
    i = torch.arange(m)
    start = (i * n).div(m, rounding_mode="floor")
    end = -((-(i + 1) * n).div(m, rounding_mode="floor"))
    pos = torch.arange(n)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
