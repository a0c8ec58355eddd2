"""budget: per-layer schedules on hand-computed examples."""

from __future__ import annotations

import itertools

import pytest

from tokenreduce.budget import fit_caps, geometric_counts, linear_weights, proportional, tokens_to_remove
from tokenreduce.errors import ConfigError


# --- tokens_to_remove ------------------------------------------------------------


def test_tokens_to_remove_keep():
    assert tokens_to_remove(196, 49, None, "X") == 147
    assert tokens_to_remove(196, 196, None, "X") == 0
    assert tokens_to_remove(196, 0, None, "X") == 196
    # keep wins over ratio when both are given
    assert tokens_to_remove(196, 100, 0.9, "X") == 96


def test_tokens_to_remove_ratio():
    assert tokens_to_remove(196, None, 0.25, "X") == 49
    assert tokens_to_remove(196, None, 0.5, "X") == 98
    assert tokens_to_remove(196, None, 1.0, "X") == 196
    assert tokens_to_remove(196, None, 0.0, "X") == 0
    assert tokens_to_remove(196, None, None, "X") == 0
    assert tokens_to_remove(10, None, 0.33, "X") == 3  # round(3.3)
    assert tokens_to_remove(10, None, 0.37, "X") == 4  # round(3.7)


def test_tokens_to_remove_keep_larger_than_reducible():
    with pytest.raises(ConfigError, match=r"ToMeConfig: keep=197 .* 196 reducible"):
        tokens_to_remove(196, 197, None, "ToMeConfig")
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        tokens_to_remove(0, 1, None, "X")


# --- proportional -------------------------------------------------------------------


def test_proportional_512_over_11_layers():
    assert proportional(512, [1.0] * 11) == [47] * 6 + [46] * 5


@pytest.mark.parametrize("total,weights,expected", [
    (10, [1, 2, 3, 4], [1, 2, 3, 4]),
    (7, [1, 1, 1], [3, 2, 2]),
    (8, [1, 1, 1], [3, 3, 2]),
    (10, [2.0, 1.0, 0.0], [7, 3, 0]),  # exact 6.67, 3.33, 0
    (5, [1, 3], [1, 4]),  # exact 1.25, 3.75 -> remainder .75 wins
    (3, [1, 1, 1, 1], [1, 1, 1, 0]),
    (1, [0.0, 1.0, 0.0], [0, 1, 0]),
    (0, [1, 2], [0, 0]),
    (5, [], []),
    (100, [1.0], [100]),
])
def test_proportional_examples(total, weights, expected):
    assert proportional(total, weights) == expected


def naive_proportional(total, weights):
    from fractions import Fraction

    exact = [Fraction(total) * Fraction(w) / sum(Fraction(v) for v in weights) for w in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def test_proportional_matches_exact_largest_remainder():
    for total, num in itertools.product([0, 1, 7, 13, 100, 147, 512], [1, 2, 3, 5, 11, 12]):
        for weights in ([1] * num, list(range(1, num + 1)), list(range(num, 0, -1))):
            got = proportional(total, weights)
            assert sum(got) == total
            assert got == naive_proportional(total, weights), (total, weights)


# --- linear_weights -------------------------------------------------------------------


def test_linear_weights():
    assert linear_weights(1, 0.5) == [1.0]
    assert linear_weights(3, 0.0) == [1.0, 1.0, 1.0]
    assert linear_weights(3, -1.0) == [2.0, 1.0, 0.0]
    assert linear_weights(5, 1.0) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert linear_weights(5, 0.5) == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert sum(linear_weights(12, -0.3)) == pytest.approx(12)


# --- fit_caps -----------------------------------------------------------------------


def test_fit_caps_feasible_unchanged():
    assert fit_caps([3, 3, 3], 20, lambda n: 4, "X") == [3, 3, 3]


def test_fit_caps_carries_excess_forward():
    assert fit_caps([6, 2, 2], 20, lambda n: 4, "X") == [4, 4, 2]
    assert fit_caps([9, 0, 0], 20, lambda n: 4, "X") == [4, 4, 1]


def test_fit_caps_replaces_from_the_front_when_carry_is_left():
    # Carrying leaves 3 over at the end ([1, 1, 3]); re-placed greedily: [3, 3, 2].
    assert fit_caps([1, 1, 6], 20, lambda n: 3, "X") == [3, 3, 2]


def test_fit_caps_cap_depends_on_current_tokens():
    # ToMe-like cap: at most half of the current tokens (rounded down).
    # 16 tokens: want 10, cap 8 -> 8, carry 2; 8 left: want 3+2, cap 4 -> 4, carry 1;
    # 4 left: want 1+1, cap 2 -> 2. Total 14 = 10 + 3 + 1.
    assert fit_caps([10, 3, 1], 16, lambda n: n // 2, "X") == [8, 4, 2]


def test_fit_caps_infeasible_raises():
    with pytest.raises(ConfigError, match=r"FiCoCoVConfig: cannot remove 12 of 20 tokens over 2 layers \(at most 8\)"):
        fit_caps([6, 6], 20, lambda n: 4, "FiCoCoVConfig")
    with pytest.raises(ConfigError):
        fit_caps([8, 8, 0], 16, lambda n: n // 2, "X")  # at most 8 + 4 + 2 = 14


def test_fit_caps_keeps_total_and_respects_caps():
    for wanted in ([5, 0, 0, 0], [0, 0, 0, 9], [2, 7, 1, 3], [4, 4, 4, 4]):
        start = 30
        got = fit_caps(wanted, start, lambda n: max(0, n // 3), "X")
        assert sum(got) == sum(wanted)
        current = start
        for take in got:
            assert 0 <= take <= current // 3
            current -= take


# --- geometric_counts -------------------------------------------------------------------


def test_geometric_counts_hand_example():
    # q = 0.25 ** (1/4) = 0.7071: 196 q = 138.6, 196 q^2 = 98, 196 q^3 = 69.3
    assert geometric_counts(196, 49, 4) == [139, 98, 69, 49]
    assert geometric_counts(100, 25, 2) == [50, 25]


def test_geometric_counts_edges():
    assert geometric_counts(196, 49, 0) == []
    assert geometric_counts(196, 0, 3) == [0, 0, 0]
    assert geometric_counts(196, 49, 1) == [49]
    assert geometric_counts(10, 10, 3) == [10, 10, 10]


def test_geometric_counts_end_exactly_and_monotone():
    for start, end, steps in itertools.product([196, 197, 50, 10], [1, 5, 9, 49], [1, 2, 3, 7, 11]):
        if end > start:
            continue
        counts = geometric_counts(start, end, steps)
        assert len(counts) == steps and counts[-1] == end
        assert all(a >= b for a, b in zip([start] + counts, counts))
        assert all(c >= end for c in counts)
