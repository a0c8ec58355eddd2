"""ops.scoring: probes against an explicit eager attention map and hand-picked grids."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.ops.scoring import (
    attention_logits,
    attention_received,
    cls_attention,
    grid_cells,
    iqr_outliers,
    l2_normalize,
    key_metric,
    mean_key_logits,
    merge_heads,
    row_attention,
    text_relevance,
    window_penalty,
)


def qk(seed: int, batch=2, heads=3, n=7, d=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, d, generator=g).to(dtype), torch.randn(batch, heads, n, d, generator=g).to(dtype)


def eager_map(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Explicit per-head softmax(q k^T * scale) in float64, [B, H, N, N], by loops over python lists."""
    qs, ks = q.double().tolist(), k.double().tolist()
    out = []
    for qb, kb in zip(qs, ks):
        heads = []
        for qh, kh in zip(qb, kb):
            rows = []
            for qi in qh:
                logits = [scale * sum(a * b for a, b in zip(qi, kj)) for kj in kh]
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                rows.append([e / sum(exps) for e in exps])
            heads.append(rows)
        out.append(heads)
    return torch.tensor(out, dtype=torch.float64)


def test_cls_attention_is_cls_row_of_eager_softmax():
    q, k = qk(0)
    scale = 4**-0.5
    got = cls_attention(q, k, scale)
    assert got.shape == (2, 7) and got.dtype == torch.float32
    want = eager_map(q, k, scale)[:, :, 0].mean(dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_cls_attention_hand_built():
    # One head, d=1, scale 1: [CLS] query 1, keys [0, log 2, log 3] -> softmax = [1, 2, 3] / 6.
    q = torch.tensor([[[[1.0], [5.0], [5.0]]]])
    k = torch.tensor([[[[0.0], [math.log(2)], [math.log(3)]]]])
    torch.testing.assert_close(cls_attention(q, k, 1.0), torch.tensor([[1 / 6, 2 / 6, 3 / 6]]))
    # Two heads: the mean is over heads of the probabilities.
    q2 = torch.cat([q, q], dim=1)
    k2 = torch.cat([k, torch.zeros_like(k)], dim=1)  # second head uniform
    torch.testing.assert_close(cls_attention(q2, k2, 1.0), torch.tensor([[(1 / 6 + 1 / 3) / 2, (2 / 6 + 1 / 3) / 2, (3 / 6 + 1 / 3) / 2]]))


def test_cls_attention_bf16_inputs_computed_in_fp32():
    q, k = qk(1, dtype=torch.bfloat16)
    got = cls_attention(q, k, 0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), eager_map(q.float(), k.float(), 0.5)[:, :, 0].mean(1), rtol=1e-5, atol=1e-6)


def test_row_attention_logits_and_probs():
    q, k = qk(2)
    scale = 0.3
    rows = torch.tensor([1, 4])
    probs = row_attention(q, k, scale, rows, probs=True)
    torch.testing.assert_close(probs.double(), eager_map(q, k, scale)[:, :, [1, 4]].mean(1), rtol=1e-5, atol=1e-6)
    logits = row_attention(q, k, scale, rows, probs=False)
    want = torch.einsum("bhid,bhjd->bhij", q.double()[:, :, [1, 4]], k.double()).mul(scale).mean(1)
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_logits_full_map():
    q, k = qk(3)
    got = attention_logits(q, k, 0.5)
    want = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()).mul(0.5).mean(1)
    assert got.shape == (2, 7, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 6, 7, 8, 256])
def test_attention_received_is_column_sum_of_eager_map(chunk):
    q, k = qk(4)
    scale = 4**-0.5
    got = attention_received(q, k, scale, chunk=chunk)
    want = eager_map(q, k, scale).sum(dim=2).mean(dim=1)  # sum over queries, mean over heads
    assert got.shape == (2, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((2,), 7.0))  # every query row sums to 1


def test_attention_received_hand_built():
    # All logits equal: every token receives N * (1/N) = 1.
    q = torch.zeros(1, 2, 5, 3)
    k = torch.randn(1, 2, 5, 3)
    torch.testing.assert_close(attention_received(q, k, 1.0, chunk=2), torch.ones(1, 5))


def test_key_metric_and_mean_key_logits():
    q, k = qk(5)
    torch.testing.assert_close(key_metric(k), k.sum(dim=1))
    got = mean_key_logits(k, 0.5)
    kd = k.double()
    query = kd.mean(dim=2)  # [B, H, d] mean over tokens
    want = (torch.einsum("bhd,bhjd->bhj", query, kd) * 0.5).mean(dim=1)
    assert got.shape == (2, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_l2_normalize():
    scores = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    got = l2_normalize(scores)
    assert torch.equal(got[0], torch.tensor([0.6, 0.8]))
    assert got[1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got[2], torch.full((2,), 2**-0.5))


# --- window_penalty -----------------------------------------------------------


def naive_window_penalty(scores, cells, coefficient):
    out = []
    for row, crow in zip(scores.tolist(), cells.tolist()):
        row = list(row)
        for cell in set(c for c in crow if c >= 0):
            members = [i for i, c in enumerate(crow) if c == cell]
            worst = min(members, key=lambda i: (row[i], i))
            row[worst] = row[worst] / coefficient if row[worst] > 0 else row[worst] * coefficient
        out.append(row)
    return torch.tensor(out)


def test_window_penalty_4x4_grid_hand_picked():
    # 4x4 grid, 2x2 windows -> cells
    #   0 0 1 1
    #   0 0 1 1
    #   2 2 3 3
    #   2 2 3 3
    cells = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]])
    scores = torch.tensor([[
        5.0, 4.0, 9.0, 8.0,
        3.0, 6.0, 2.0, 7.0,   # window 0 worst: 3 (index 4); window 1 worst: 2 (index 6)
        -1.0, 0.5, 1.0, 1.0,  # window 2 worst: -2 (index 13); window 3 tie at 1.0 -> earliest, index 10
        0.0, -2.0, 1.0, 4.0,
    ]])
    got = window_penalty(scores, cells, 2.0)
    expected = scores.clone()
    expected[0, 4] = 1.5   # 3 / 2
    expected[0, 6] = 1.0   # 2 / 2
    expected[0, 13] = -4.0  # -2 * 2 (non-positive: multiplied)
    expected[0, 10] = 0.5  # 1 / 2, the earlier of the tie (index 14 untouched)
    assert got.tolist() == expected.tolist()


def test_window_penalty_zero_and_out_of_window():
    # Cell -1 tokens are never penalised even when they are the lowest; a zero stays zero.
    scores = torch.tensor([[-9.0, 0.0, 1.0, 2.0, 3.0]])
    cells = torch.tensor([[-1, 0, 0, 1, 1]])
    # window 0 = {0.0, 1.0}: 0 is lowest and not positive -> 0 * 3 = 0; window 1 = {2, 3}: 2 / 3
    assert torch.equal(window_penalty(scores, cells, 3.0), torch.tensor([[-9.0, 0.0, 1.0, 2.0 / 3.0, 3.0]]))
    assert window_penalty(scores, torch.full_like(cells, -1), 3.0).tolist() == scores.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_window_penalty_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (3, 20), generator=g).float()  # many ties
    cells = torch.randint(-1, 5, (3, 20), generator=g)
    got = window_penalty(scores, cells, 1.5)
    torch.testing.assert_close(got, naive_window_penalty(scores, cells, 1.5), rtol=0, atol=0)


# --- grid_cells ----------------------------------------------------------------


def test_grid_cells_4x4_window_2_with_protected_and_appended():
    # [CLS] at position 0, 16 patches at positions 1..16, an appended token at -1.
    positions = torch.tensor([[0] + list(range(1, 17)) + [-1]])
    got = grid_cells(positions, 1, (4, 4), 2)
    assert got.tolist() == [[-1, 0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3, -1]]


def test_grid_cells_after_reduction_and_partial_windows():
    # 5x5 grid, window 2: 3 cells per row (the last one partial); two protected tokens.
    positions = torch.tensor([[0, 1, 2, 6, 8, 26, -1], [1, 7, 11, 20, 23, 15, 0]])
    got = grid_cells(positions, 2, (5, 5), 2)
    # patch = pos - 2: 0 -> (0,0) cell 0; 4 -> (0,4) cell 2; 6 -> (1,1) cell 0; 24 -> (4,4) cell 8;
    # 5 -> (1,0) cell 0; 9 -> (1,4) cell 2; 18 -> (3,3) cell 4; 21 -> (4,1) cell 6; 13 -> (2,3) cell 4
    assert got.tolist() == [[-1, -1, 0, 2, 0, 8, -1], [-1, 0, 2, 4, 6, 4, -1]]


def test_grid_cells_matches_naive():
    rows, cols, window, protected = 6, 7, 3, 1
    positions = torch.arange(-1, rows * cols + protected).view(1, -1)
    got = grid_cells(positions, protected, (rows, cols), window)[0].tolist()
    per_row = -(-cols // window)
    for pos, cell in zip(positions[0].tolist(), got):
        if pos < protected:
            assert cell == -1
        else:
            r, c = divmod(pos - protected, cols)
            assert cell == (r // window) * per_row + c // window


# --- PruMerge: single-head-style [CLS] attention and IQR outliers ------------------


def test_merge_heads_gives_the_full_width_dot_product():
    q, k = qk(3)
    scale = (q.shape[1] * q.shape[3]) ** -0.5
    got = cls_attention(merge_heads(q), merge_heads(k), scale)
    logits = torch.einsum("bhd,bhnd->bn", q[:, :, 0].double(), k.double()) * scale  # sum over heads of q_h . k_h
    torch.testing.assert_close(got, logits.softmax(dim=-1).float())
    assert merge_heads(q)[0, 0, 2].tolist() == q[0, :, 2].flatten().tolist()


def test_iqr_outliers_hand_built():
    # quartiles of 0..7 plus 40 (9 values, linear): Q1 = 2, Q3 = 6, fence 12 -> only 40
    scores = torch.tensor([[0.0, 1, 2, 3, 40, 4, 5, 6, 7]])
    assert iqr_outliers(scores).nonzero()[:, 1].tolist() == [4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iqr_outliers_match_numpy_percentile(seed):
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 37, generator=g) ** 6  # skewed, like [CLS] attention
    for row, got in zip(scores.double().numpy(), iqr_outliers(scores)):
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        assert got.tolist() == (row > q3 + 1.5 * (q3 - q1)).tolist()


# --- CDPruner: instruction relevance ---------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_text_relevance_matches_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(2, 6, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = text_relevance(visual, text, mask)
    for b in range(2):
        raw = []
        for i in range(6):
            cos = [float(torch.nn.functional.cosine_similarity(visual[b, i].double(), text[b, j].double(), dim=0)) for j in range(4) if mask[b, j]]
            raw.append(-sum(cos) / len(cos))
        low, high = min(raw), max(raw)
        torch.testing.assert_close(got[b], torch.tensor([(r - low) / (high - low) for r in raw]), rtol=1e-5, atol=1e-6)


def test_text_relevance_without_text_is_one():
    visual = torch.randn(2, 6, 5)
    got = text_relevance(visual, torch.randn(2, 3, 5), torch.tensor([[False] * 3, [True] * 3]))
    assert got[0].tolist() == [1.0] * 6 and got[1].min() == 0.0 and got[1].max() == 1.0
