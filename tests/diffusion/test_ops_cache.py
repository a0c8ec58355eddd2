"""ops.cache: exact results on hand-built tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenreduce.ops.cache import (
    cell_bonus,
    cross_attention_probs,
    entropy,
    polynomial,
    relative_l1,
    scatter_rows,
    taylor_forecast,
    taylor_update,
    tensor_bytes,
    top_rows,
)


def bonus_oracle(score: torch.Tensor, rows: int, cols: int, cell: int, bonus: float) -> torch.Tensor:
    """Loop version: in every cell (partial at the edges) the first maximum in raster order gets x(1 + bonus)."""
    out = score.clone()
    for b in range(score.shape[0]):
        for r0 in range(0, rows, cell):
            for c0 in range(0, cols, cell):
                members = [r * cols + c for r in range(r0, min(r0 + cell, rows)) for c in range(c0, min(c0 + cell, cols))]
                best = max(members, key=lambda i: (score[b, i].item(), -i))
                out[b, best] = score[b, best] * (1 + bonus)
    return out


@pytest.mark.parametrize("grid, cell", [((4, 4), 2), ((8, 8), 4), ((3, 5), 2), ((6, 4), 4)])
def test_cell_bonus_matches_the_loop_oracle_on_square_and_ragged_grids(grid, cell):
    score = torch.rand(2, grid[0] * grid[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cell_bonus(score, grid, cell, 0.6), bonus_oracle(score, *grid, cell, 0.6), rtol=0, atol=0)


def test_cell_bonus_breaks_ties_by_raster_order():
    score = torch.ones(1, 4)
    assert cell_bonus(score, (2, 2), 2, 0.5).tolist() == [[1.5, 1.0, 1.0, 1.0]]


def test_entropy_of_uniform_and_one_hot_rows():
    probs = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])
    h = entropy(probs)
    assert h[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_cross_attention_probs_equal_an_explicit_masked_softmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    bias = torch.zeros(2, 1, 6)
    bias[:, :, -2:] = -10000.0
    expected = torch.empty(2, 5, 6)
    for b in range(2):
        per_head = []
        for h in range(3):
            logits = q[b, h] @ k[b, h].T / 2.0 + bias[b]
            per_head.append(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True))
        expected[b] = torch.stack(per_head).mean(0)
    got = cross_attention_probs(q, k, bias)
    torch.testing.assert_close(got, expected)
    assert got[..., -2:].max() < 1e-6


def test_relative_l1_is_per_sample():
    previous = torch.tensor([[1.0, -1.0], [2.0, 2.0]])
    current = torch.tensor([[1.5, -1.5], [2.0, 2.0]])
    assert relative_l1(current, previous).tolist() == [0.5, 0.0]


def test_polynomial_uses_highest_power_first_like_numpy_poly1d():
    x = torch.tensor([0.0, 0.3, 1.7])
    coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    torch.testing.assert_close(polynomial(coefficients, x), torch.tensor(np.poly1d(coefficients)(x.numpy()), dtype=torch.float32))


def test_taylor_forecast_is_exact_for_a_polynomial_of_its_order():
    def f(s: float) -> torch.Tensor:
        return torch.tensor([2.0 + 3.0 * s, 1.0 - s])  # linear: order 1 is exact

    factors: list[torch.Tensor] = []
    for s, gap in ((0, 0), (3, 3)):
        factors = taylor_update(factors, f(s), gap, order=1)
    torch.testing.assert_close(taylor_forecast(factors, 2.0), f(5))
    assert len(taylor_update(factors, f(6), 3, order=1)) == 2


def test_taylor_order_two_uses_backward_differences():
    def f(s: float) -> torch.Tensor:
        return torch.tensor([s * s, 1.0 + s])

    factors: list[torch.Tensor] = []
    for s, gap in ((0, 0), (1, 1), (2, 1)):
        factors = taylor_update(factors, f(s), gap, order=2)
    assert [t.tolist() for t in factors] == [[4.0, 3.0], [3.0, 1.0], [2.0, 0.0]]  # f(2), (f(2)-f(1))/1, ((3)-(1))/1
    torch.testing.assert_close(taylor_forecast(factors, 1.0), torch.tensor([4.0 + 3.0 + 2.0 / 2, 4.0]))


def test_top_rows_and_scatter_rows():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    rows = top_rows(score, 2)
    assert rows.tolist() == [[1, 3]]
    cache = torch.zeros(1, 4, 2, dtype=torch.bfloat16)
    scatter_rows(cache, rows, torch.ones(1, 2, 2))
    assert cache.dtype == torch.bfloat16 and cache[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_tensor_bytes_walks_nested_containers():
    store = {"a": torch.zeros(2, 3), ("b", 1): [torch.zeros(4, dtype=torch.bfloat16), (torch.zeros(1),)], "n": 3}
    assert tensor_bytes(store) == 2 * 3 * 4 + 4 * 2 + 4
