"""ops.grid: sub-grids and pooling cells against hand-computed values and adaptive_avg_pool2d."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokenreduce.ops.grid import factor_grid, pooling_cells, stride_indices
from tokenreduce.ops.merge import TokenPlan, apply_plan


# --- factor_grid ---------------------------------------------------------------


@pytest.mark.parametrize("k,rows,cols,expected", [
    (16, 8, 8, (4, 4)), (9, 8, 8, (3, 3)), (64, 8, 8, (8, 8)), (1, 8, 8, (1, 1)), (8, 8, 8, (2, 4)),
    (6, 6, 4, (3, 2)), (6, 7, 5, (3, 2)), (10, 7, 5, (5, 2)), (35, 7, 5, (7, 5)), (7, 7, 5, (7, 1)),
    (49, 14, 14, (7, 7)), (98, 14, 14, (7, 14)), (12, 4, 6, (3, 4)),
])
def test_factor_grid(k, rows, cols, expected):
    assert factor_grid(k, rows, cols) == expected


def test_factor_grid_is_the_closest_aspect_ratio():
    for rows, cols in [(8, 8), (6, 4), (7, 5), (3, 9), (14, 14)]:
        for k in range(1, rows * cols + 1):
            pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= rows and k // a <= cols]
            if not pairs:
                with pytest.raises(ValueError):
                    factor_grid(k, rows, cols)
                continue
            r, c = factor_grid(k, rows, cols)
            assert r * c == k and r <= rows and c <= cols
            best = min(abs(math.log(a / b) - math.log(rows / cols)) for a, b in pairs)
            assert abs(math.log(r / c) - math.log(rows / cols)) == best


@pytest.mark.parametrize("k,rows,cols", [(11, 8, 8), (13, 8, 8), (65, 8, 8), (7, 6, 4), (11, 7, 5), (9, 2, 2)])
def test_factor_grid_raises_when_impossible(k, rows, cols):
    with pytest.raises(ValueError, match="cannot pool"):
        factor_grid(k, rows, cols)


# --- stride_indices --------------------------------------------------------------


def test_stride_16_on_8x8_is_rows_cols_0_2_5_7():
    # round(linspace(0, 7, 4)) = round([0, 2.33, 4.67, 7]) = [0, 2, 5, 7]
    assert torch.linspace(0, 7, 4).round().long().tolist() == [0, 2, 5, 7]
    got = stride_indices(16, 8, 8)
    assert got.tolist() == [r * 8 + c for r in (0, 2, 5, 7) for c in (0, 2, 5, 7)]


def test_stride_hand_examples():
    # 4 on 8x8: rows/cols {0, 7} -> corners
    assert stride_indices(4, 8, 8).tolist() == [0, 7, 56, 63]
    # 1 on 8x8: the first patch
    assert stride_indices(1, 8, 8).tolist() == [0]
    # 10 on 8x8: a 3x3 sub-grid {0, 4, 7}^2 (round(3.5) = 4, half to even) topped up with raster index 1
    assert torch.linspace(0, 7, 3).round().long().tolist() == [0, 4, 7]
    assert stride_indices(10, 8, 8).tolist() == sorted([r * 8 + c for r in (0, 4, 7) for c in (0, 4, 7)] + [1])
    # 6 on 6x4: sub-grid 3 rows x 2 cols: rows round(linspace(0, 5, 3)) = [0, 2, 5] (2.5 -> 2), cols [0, 3]
    assert stride_indices(6, 6, 4).tolist() == [0, 3, 8, 11, 20, 23]
    # everything
    assert stride_indices(35, 7, 5).tolist() == list(range(35))


@pytest.mark.parametrize("rows,cols", [(8, 8), (6, 4), (7, 5), (14, 14), (2, 9), (1, 6)])
def test_stride_returns_exactly_k_ascending_unique(rows, cols):
    for k in range(1, rows * cols + 1):
        got = stride_indices(k, rows, cols).tolist()
        assert len(got) == k, (k, rows, cols)
        assert got == sorted(set(got)), (k, rows, cols)
        assert 0 <= got[0] and got[-1] < rows * cols


# --- pooling_cells -----------------------------------------------------------------


def pool_with_cells(x: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    """Weighted average of raster-ordered patches x [rows*cols, C] over the membership table."""
    cells, weights = pooling_cells(k, rows, cols)
    total = torch.zeros(k, x.shape[1], dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    for p in range(rows * cols):
        for cell, w in zip(cells[p].tolist(), weights[p].tolist()):
            if w:
                total[cell] += w * x[p].double()
                count[cell] += w
    return total / count[:, None]


CASES = [(16, 8, 8), (9, 8, 8), (4, 8, 8), (25, 8, 8), (6, 6, 4), (4, 6, 4), (6, 7, 5), (10, 7, 5), (35, 7, 5),
         (4, 7, 5), (49, 14, 14), (1, 8, 8), (2, 8, 8), (3, 7, 5), (2, 1, 3)]


@pytest.mark.parametrize("k,rows,cols", CASES)
def test_pooling_cells_reproduce_adaptive_avg_pool2d(k, rows, cols):
    out_rows, out_cols = factor_grid(k, rows, cols)
    g = torch.Generator().manual_seed(k * 100 + rows * 10 + cols)
    image = torch.randn(3, rows, cols, generator=g, dtype=torch.float64)
    want = F.adaptive_avg_pool2d(image, (out_rows, out_cols)).flatten(1).T  # [k, C] raster order
    got = pool_with_cells(image.flatten(1).T, k, rows, cols)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,rows,cols", CASES)
def test_pooling_plan_through_apply_plan(k, rows, cols):
    # The pooling baseline's plan: [CLS] kept, every patch folded into k appended cells.
    out_rows, out_cols = factor_grid(k, rows, cols)
    cells, weights = pooling_cells(k, rows, cols)
    assert cells.shape == weights.shape and cells.shape[0] == rows * cols and cells.shape[1] <= 4
    assert cells.dtype == torch.long and ((weights == 0) | (weights == 1)).all()
    assert (cells >= 0).all() and (cells < k).all()
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 1 + rows * cols, 5, generator=g)
    plan = TokenPlan(
        keep=torch.zeros(2, 1, dtype=torch.long), merge_src=torch.arange(1, 1 + rows * cols).expand(2, -1),
        merge_dst=(cells + 1).expand(2, -1, -1), merge_weight=weights.expand(2, -1, -1), new_tokens=k,
    )
    out, sizes = apply_plan(plan, x)
    image = x[:, 1:].transpose(1, 2).reshape(2, 5, rows, cols)
    want = F.adaptive_avg_pool2d(image, (out_rows, out_cols)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])
    window_h = [math.ceil((i + 1) * rows / out_rows) - (i * rows) // out_rows for i in range(out_rows)]
    window_w = [math.ceil((j + 1) * cols / out_cols) - (j * cols) // out_cols for j in range(out_cols)]
    assert sizes[0, 1:].tolist() == [float(h * w) for h in window_h for w in window_w]


def test_pooling_8x8_to_3x3_overlaps():
    # Windows on an axis of 8 pooled to 3: [0, 3), [2, 6), [5, 8); patch (2, 2) is in 4 cells.
    cells, weights = pooling_cells(9, 8, 8)
    members = {c for c, w in zip(cells[2 * 8 + 2].tolist(), weights[2 * 8 + 2].tolist()) if w}
    assert members == {0, 1, 3, 4}
    members = {c for c, w in zip(cells[0].tolist(), weights[0].tolist()) if w}
    assert members == {0}
    members = {c for c, w in zip(cells[5 * 8 + 7].tolist(), weights[5 * 8 + 7].tolist()) if w}
    assert members == {5, 8}


def test_pooling_8x8_to_4x4_disjoint():
    cells, weights = pooling_cells(16, 8, 8)
    assert weights.sum(-1).tolist() == [1.0] * 64
    first = cells[torch.arange(64), weights.argmax(-1)]
    assert first.tolist() == [(p // 8 // 2) * 4 + (p % 8) // 2 for p in range(64)]
