"""ops.matching: exact results on hand-built tensors and naive per-row references."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.ops.matching import (
    bipartite_soft_matching,
    dpp_greedy_map,
    keep_top,
    max_bipartite_merges,
    nearest_neighbours,
    plan_fold,
    plan_prune,
    quantile_targets,
)
from tokenreduce.ops.merge import apply_plan


# --- bipartite_soft_matching -------------------------------------------------


def naive_bipartite(metric: torch.Tensor, r: int, protected: int):
    """ToMe by loops: A = even, B = odd, cosine similarity, best r A tokens folded, order kept."""
    out = []
    for rows in metric.double().tolist():
        n = len(rows)
        unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
        best = []  # (score, a_index, b_index)
        for i in range(0, n, 2):
            if i < protected:
                continue
            candidates = [(sum(p * q for p, q in zip(unit[i], unit[j])), j) for j in range(1, n, 2) if j >= protected]
            score, j = max(candidates, key=lambda c: (c[0], -c[1]))  # first on ties
            best.append((score, i, j))
        best.sort(key=lambda c: (-c[0], c[1]))
        merged = best[:r]
        src = [i for _, i, _ in merged]
        keep = [i for i in range(n) if i not in src]
        dst = [keep.index(j) for _, _, j in merged]
        out.append((keep, src, dst))
    return out


def test_hand_built_metric_matches_known_pairs():
    # 6 tokens in 2-D: A = {0, 2, 4}, B = {1, 3, 5}.
    # 0 ~ 1 exactly (cos 1), 4 ~ 5 nearly (cos ~0.995), 2's best (3) is only cos ~0.15.
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.05], [-0.2, -1.0], [0.1, 1.0], [0.0, 1.0]]])
    plan = bipartite_soft_matching(metric, r=2)
    assert plan.keep.tolist() == [[1, 2, 3, 5]]
    assert plan.merge_src.tolist() == [[0, 4]]  # best score first
    assert plan.merge_dst.tolist() == [[[0], [3]]]  # token 1 -> position 0, token 5 -> position 3
    assert plan.merge_weight.tolist() == [[[1.0], [1.0]]]
    # r=1 takes only the exact match.
    plan1 = bipartite_soft_matching(metric, r=1)
    assert plan1.keep.tolist() == [[1, 2, 3, 4, 5]] and plan1.merge_src.tolist() == [[0]]
    assert plan1.merge_dst.tolist() == [[[0]]]


def test_hand_built_merge_is_size_weighted():
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.05], [-0.2, -1.0], [0.1, 1.0], [0.0, 1.0]]])
    x = torch.tensor([[[1.0], [3.0], [10.0], [20.0], [6.0], [2.0]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0, 2.0, 2.0]])
    out, out_sizes = apply_plan(bipartite_soft_matching(metric, r=2), x, sizes)
    # (1*1 + 3*3)/4 = 2.5 ; (2*6 + 2*2)/4 = 4
    assert out.tolist() == [[[2.5], [10.0], [20.0], [4.0]]]
    assert out_sizes.tolist() == [[4.0, 1.0, 1.0, 4.0]]


def test_r_zero_keeps_everything():
    metric = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    plan = bipartite_soft_matching(metric, r=0, protected=1)
    assert plan.keep.tolist() == [list(range(7))] * 2
    assert plan.merge_src.shape == (2, 0)
    x = torch.randn(2, 7, 3)
    out, sizes = apply_plan(plan, x)
    assert torch.equal(out, x) and torch.equal(sizes, torch.ones(2, 7))


@pytest.mark.parametrize("n,protected", [(n, p) for n in (2, 3, 4, 7, 8, 13) for p in (0, 1, 2, 3) if n >= p + 2])
def test_protected_never_merged_nor_targets(n, protected):
    g = torch.Generator().manual_seed(n * 10 + protected)
    # Make the protected tokens the most similar to everything: they must still be skipped.
    metric = torch.randn(3, n, 5, generator=g) * 0.1
    metric[:, :protected] = metric[:, protected:].mean(dim=1, keepdim=True) * 10
    r = max_bipartite_merges(n, protected)
    plan = bipartite_soft_matching(metric, r, protected)
    assert plan.keep.shape == (3, n - r)
    for b in range(3):
        keep = plan.keep[b].tolist()
        assert keep == sorted(keep) and len(set(keep)) == len(keep)
        assert keep[:protected] == list(range(protected))
        assert all(s >= protected for s in plan.merge_src[b].tolist())
        assert all(keep[d] >= protected for d in plan.merge_dst[b, :, 0].tolist())
        assert all(s % 2 == 0 for s in plan.merge_src[b].tolist())  # sources come from A
        assert all(keep[d] % 2 == 1 for d in plan.merge_dst[b, :, 0].tolist())  # targets come from B


@pytest.mark.parametrize("n,r,protected", [(2, 1, 0), (5, 2, 0), (8, 3, 1), (9, 4, 1), (10, 4, 2), (17, 7, 3), (16, 0, 1), (33, 16, 1), (12, 5, 2)])
def test_matches_naive_loop(n, r, protected):
    g = torch.Generator().manual_seed(n * 100 + r * 10 + protected)
    metric = torch.randn(4, n, 6, generator=g, dtype=torch.float64)
    plan = bipartite_soft_matching(metric, r, protected)
    for b, (keep, src, dst) in enumerate(naive_bipartite(metric, r, protected)):
        assert plan.keep[b].tolist() == keep
        assert plan.merge_src[b].tolist() == src
        assert plan.merge_dst[b, :, 0].tolist() == dst
    assert torch.equal(plan.merge_weight, torch.ones(4, r, 1))


def test_matching_is_per_sample():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 9, 4, generator=g)
    batched = bipartite_soft_matching(metric, 3, 1)
    for b in range(3):
        single = bipartite_soft_matching(metric[b : b + 1], 3, 1)
        assert torch.equal(single.keep[0], batched.keep[b])
        assert torch.equal(single.merge_src[0], batched.merge_src[b])
        assert torch.equal(single.merge_dst[0], batched.merge_dst[b])


def test_metric_scale_is_irrelevant():
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(1, 10, 4, generator=g, dtype=torch.float64)
    scale = torch.rand(1, 10, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    a, b = bipartite_soft_matching(metric, 4, 1), bipartite_soft_matching(metric * scale, 4, 1)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.merge_src, b.merge_src) and torch.equal(a.merge_dst, b.merge_dst)


@pytest.mark.parametrize("n,protected,expected", [
    (197, 1, 98), (196, 0, 98), (10, 1, 4), (10, 2, 4), (9, 1, 4), (9, 2, 4), (4, 1, 1), (3, 1, 1), (2, 1, 0), (2, 0, 1),
])
def test_max_bipartite_merges(n, protected, expected):
    assert max_bipartite_merges(n, protected) == expected


@pytest.mark.parametrize("protected", [0, 1, 2, 3, 4])
def test_max_bipartite_merges_is_achievable_without_touching_protected(protected):
    # For every n, the cap must equal the number of unprotected A tokens that have an
    # unprotected B token to merge into (0 when no unprotected B token exists).
    for n in range(protected, protected + 12):
        a_free = sum(1 for i in range(0, n, 2) if i >= protected)
        b_free = sum(1 for j in range(1, n, 2) if j >= protected)
        assert max_bipartite_merges(n, protected) == (a_free if b_free else 0), (n, protected)


def test_lone_reducible_token_cannot_merge_into_protected():
    # n = 3 with [CLS] + a distillation token protected: the one patch (index 2, in A)
    # has no unprotected B partner, so no merge is possible.
    assert max_bipartite_merges(3, 2) == 0
    assert max_bipartite_merges(1, 0) == 0


# --- keep_top, plan_prune, plan_fold ------------------------------------------


def test_keep_top():
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0, 2.0], [9.0, 0.1, 0.5, 0.2, 0.4, 0.3]])
    assert keep_top(scores, 2).tolist() == [[1, 3], [0, 2]]
    # Protected tokens are kept whatever their score and the top-k is over the rest.
    assert keep_top(scores, 2, protected=2).tolist() == [[0, 1, 3, 4], [0, 1, 2, 4]]
    assert keep_top(scores, 0, protected=1).tolist() == [[0], [0]]
    assert keep_top(scores, 5, protected=1).tolist() == [list(range(6))] * 2


def test_plan_prune():
    keep = torch.tensor([[0, 2]])
    plan = plan_prune(keep)
    assert plan.keep is keep and plan.merge_src is None and plan.new_tokens == 0


def test_plan_fold_maps_targets_to_output_positions():
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    # discarded (ascending): [1, 3, 4] and [0, 2, 5]
    targets = torch.tensor([[[0, 2], [5, 5], [2, 0]], [[4, 1], [3, 3], [1, 4]]])
    weights = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]], [[0.2, 0.8], [1.0, 0.0], [0.6, 0.4]]])
    plan = plan_fold(keep, 6, targets, weights)
    assert plan.merge_src.tolist() == [[1, 3, 4], [0, 2, 5]]
    assert plan.merge_dst.tolist() == [[[0, 1], [2, 2], [1, 0]], [[2, 0], [1, 1], [0, 2]]]
    assert plan.merge_weight is weights
    x = torch.arange(6.0).view(1, 6, 1).expand(2, 6, 1)
    out, sizes = apply_plan(plan, x)
    # sample 0: out0 = (0 + .5*1 + .3*4)/1.8, out1 = (2 + .5*1 + .7*4)/2.2, out2 = (5 + 1*3)/2
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.7 / 1.8, 5.3 / 2.2, 4.0]))
    torch.testing.assert_close(sizes[0], torch.tensor([1.8, 2.2, 2.0]))


# --- quantile_targets ------------------------------------------------------------


def naive_quantile_targets(correlation: torch.Tensor, epsilon: float):
    """Per row: candidates strictly above the row's epsilon-quantile (at least the best), softmax over them."""
    result = []
    for batch_rows in correlation.double():
        rows = []
        for row in batch_rows:
            threshold = torch.quantile(row, epsilon).item()
            values = row.tolist()
            chosen = [j for j, v in enumerate(values) if v > threshold]
            if not chosen:
                # Only the best one; on a tie for best, any of the tied is right.
                rows.append({j: 1.0 for j, v in enumerate(values) if v == max(values)} | {"single": True})
                continue
            top = max(values[j] for j in chosen)
            exps = {j: math.exp(values[j] - top) for j in chosen}
            total = sum(exps.values())
            rows.append({j: e / total for j, e in exps.items()})
        result.append(rows)
    return result


def as_dicts(targets: torch.Tensor, weights: torch.Tensor):
    out = []
    for tb, wb in zip(targets.tolist(), weights.tolist()):
        rows = []
        for tr, wr in zip(tb, wb):
            d = {}
            for j, w in zip(tr, wr):
                if w > 0:
                    assert j not in d
                    d[j] = w
            rows.append(d)
        out.append(rows)
    return out


def test_clear_best_gives_one_target_with_weight_one():
    corr = torch.tensor([[[0.0, 0.1, 5.0, 0.2], [3.0, -1.0, -1.0, -1.0]]])
    targets, weights = quantile_targets(corr, 0.9)
    # quantile 0.9 of [0, .1, .2, 5] = .2 + .7 * 4.8 = 3.56 -> only index 2; row 2 -> only index 0
    assert targets.shape == (1, 2, 1)
    assert targets.tolist() == [[[2], [0]]]
    assert weights.tolist() == [[[1.0], [1.0]]]


def test_plateau_gives_several_targets_softmax_weights():
    corr = torch.tensor([[[3.0, 3.0, 0.0, 0.0], [2.0, 1.0, 0.0, -5.0], [7.0, 7.0, 7.0, 7.0]]])
    targets, weights = quantile_targets(corr, 0.5)
    got = as_dicts(targets, weights)[0]
    # row 0: quantile .5 = 1.5 -> {0, 1}, equal weights
    assert got[0].keys() == {0, 1}
    assert got[0][0] == pytest.approx(0.5) and got[0][1] == pytest.approx(0.5)
    # row 1: quantile .5 of [-5, 0, 1, 2] = 0.5 -> {0, 1}, weights softmax([2, 1])
    e = math.exp(1.0)
    assert got[1].keys() == {0, 1}
    assert got[1][0] == pytest.approx(e / (e + 1)) and got[1][1] == pytest.approx(1 / (e + 1))
    # row 2: all equal -> nothing strictly above -> exactly one target, weight 1
    assert len(got[2]) == 1 and list(got[2].values()) == [1.0]
    assert targets.shape == (1, 3, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3))


def test_epsilon_zero_uses_all_but_the_minimum():
    corr = torch.tensor([[[1.0, 2.0, 0.0]]])
    targets, weights = quantile_targets(corr, 0.0)
    got = as_dicts(targets, weights)[0][0]
    assert got.keys() == {0, 1}
    assert got[1] == pytest.approx(math.e / (1 + math.e))


@pytest.mark.parametrize("seed,epsilon,m", [(0, 0.5, 6), (1, 0.9, 10), (2, 0.998, 50), (3, 0.25, 3), (4, 0.75, 1)])
def test_quantile_targets_match_naive(seed, epsilon, m):
    g = torch.Generator().manual_seed(seed)
    corr = torch.randn(2, 5, m, generator=g)
    if m > 2:
        corr[0, 0, :2] = corr[0, 0].max() + 1.0  # a plateau at the top
    targets, weights = quantile_targets(corr, epsilon)
    assert targets.dtype == torch.long and weights.shape == targets.shape
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    want = naive_quantile_targets(corr, epsilon)
    got = as_dicts(targets, weights)
    assert targets.shape[-1] == max(1 if "single" in row else len(row) for rows in want for row in rows)
    for got_rows, want_rows in zip(got, want):
        for g_row, w_row in zip(got_rows, want_rows):
            if w_row.pop("single", False):
                assert len(g_row) == 1 and set(g_row) <= set(w_row) and list(g_row.values()) == [1.0]
                continue
            assert g_row.keys() == w_row.keys()
            for j in w_row:
                assert g_row[j] == pytest.approx(w_row[j], rel=1e-5, abs=1e-6)


def test_quantile_targets_bf16_input():
    corr = torch.tensor([[[0.0, 4.0, 4.0, 1.0]]], dtype=torch.bfloat16)
    targets, weights = quantile_targets(corr, 0.5)
    assert weights.dtype == torch.float32
    assert sorted(targets[0, 0].tolist()) == [1, 2] and weights[0, 0].tolist() == [0.5, 0.5]


@pytest.mark.parametrize("n,protected", [(3, 2), (5, 4)])
def test_matching_at_the_cap_leaves_protected_alone(n, protected):
    # One reducible token left after an even number of protected tokens: the cap is 0
    # and matching with it keeps everything (it used to fold [CLS] into the next token).
    metric = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(n))
    r = max_bipartite_merges(n, protected)
    assert r == 0
    plan = bipartite_soft_matching(metric, r, protected)
    assert plan.keep.tolist() == [list(range(n))] * 2 and plan.merge_src.shape == (2, 0)


def _naive_deduplicate(features, target, per_round):
    """One sample, python lists: the VisPruner rounds written out plainly."""
    left = list(range(features.shape[0]))
    unit = features / features.norm(dim=-1, keepdim=True)
    while len(left) > target:
        a, b = left[0::2], left[1::2]
        scores = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        drop = min(per_round, len(left) - target, len(a))
        worst = sorted(range(len(a)), key=lambda i: -scores[i])[:drop]
        dropped = {a[i] for i in worst}
        left = [t for t in left if t not in dropped]
    return left


@pytest.mark.parametrize("count, target, per_round", [(20, 5, 8), (17, 16, 8), (30, 2, 3), (9, 9, 8)])
def test_deduplicate_matches_a_naive_loop(count, target, per_round):
    from tokenreduce.ops.matching import deduplicate

    features = torch.randn(3, count, 6, generator=torch.Generator().manual_seed(count))
    got = deduplicate(features, target, per_round)
    assert got.shape == (3, target)
    for b in range(3):
        assert got[b].tolist() == _naive_deduplicate(features[b], target, per_round)


def test_deduplicate_removes_exact_duplicates_first():
    from tokenreduce.ops.matching import deduplicate

    e = torch.eye(4)
    # A = positions 0, 2, 4 = e0, e1, e3; B = positions 1, 3, 5 = e0, e2, e3: A's e0 and e3 are duplicates.
    features = torch.stack([e[0], e[0], e[1], e[2], e[3], e[3]]).unsqueeze(0)
    assert deduplicate(features, 4, 8)[0].tolist() == [1, 2, 3, 5]


# --- nearest_neighbours (PruMerge correlate) -----------------------------------


def test_nearest_neighbours_hand_built():
    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]])
    got = nearest_neighbours(metric, torch.tensor([[0, 2]]), 2)
    assert got.tolist() == [[[1, 3], [3, 1]]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_neighbours_match_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, 11, 5, generator=g)
    anchors = torch.stack([torch.randperm(11, generator=g)[:4] for _ in range(2)])
    got = nearest_neighbours(metric, anchors, 3)
    for b in range(2):
        for a, anchor in enumerate(anchors[b].tolist()):
            cos = {j: float(torch.nn.functional.cosine_similarity(metric[b, anchor], metric[b, j], dim=0)) for j in range(11) if j != anchor}
            expected = sorted(cos, key=lambda j: -cos[j])[:3]
            assert got[b, a].tolist() == expected


# --- dpp_greedy_map (CDPruner selection) ----------------------------------------


def naive_dpp_map(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the item maximising log det of the selected kernel block."""
    kernel, chosen = kernel.double(), []
    for _ in range(k):
        best, best_value = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            index = torch.tensor(chosen + [j])
            sign, logdet = torch.linalg.slogdet(kernel[index][:, index])
            value = float(logdet) if sign > 0 else -math.inf
            if value > best_value:
                best, best_value = j, value
        chosen.append(best)
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_dpp_greedy_map_matches_log_det_greedy(seed, k):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 12, 16, generator=g)
    quality = torch.rand(2, 12, generator=g) + 0.5
    unit = features / features.norm(dim=-1, keepdim=True)
    kernel = quality.unsqueeze(2) * (unit @ unit.transpose(-1, -2)) * quality.unsqueeze(1)
    got = dpp_greedy_map(kernel, k)
    assert [naive_dpp_map(kernel[b], k) for b in range(2)] == got.tolist()


def test_dpp_greedy_map_skips_duplicates_and_prefers_quality():
    # items 0 and 1 are identical (det of the pair is 0); item 2 is orthogonal with lower quality
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    quality = torch.tensor([[2.0, 1.5, 1.0]])
    kernel = quality.unsqueeze(2) * (features @ features.transpose(-1, -2)) * quality.unsqueeze(1)
    assert dpp_greedy_map(kernel, 2).tolist() == [[0, 2]]
    assert dpp_greedy_map(kernel, 3).tolist() == [[0, 1, 2]]  # past the rank: stays finite and distinct
