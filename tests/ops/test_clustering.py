"""clustering: DPC-kNN on a hand-computed example and against a plain per-sample loop."""

from __future__ import annotations

import math

import torch

from tokenreduce.ops.clustering import dpc_knn

LINE = torch.tensor([0.0, 0.3, 1.0, 5.0, 5.2, 6.0])


def test_dpc_knn_on_points_of_a_line():
    """k = 3 (the point and its 2 nearest). Densities exp(-mean d^2):
    0.0: (0 + .09 + 1)/3 -> .695; 0.3: (0 + .09 + .49)/3 -> .824; 1.0: (0 + .49 + 1)/3 -> .609;
    5.0: (0 + .04 + 1)/3 -> .707; 5.2: (0 + .04 + .64)/3 -> .797; 6.0: (0 + .64 + 1)/3 -> .579.
    rho * delta: 0.3 is densest (delta = 6.0, the largest distance) -> 4.95; 5.2 -> .797 * 4.9 = 3.91;
    6.0 -> .579 * .8 = .463; 1.0 -> .609 * .7 = .426; 0.0 -> .695 * .3; 5.0 -> .707 * .2.
    """
    centres, assignment = dpc_knn(LINE.view(1, 6, 1), clusters=2, k=3)
    assert centres.tolist() == [[1, 4]]
    assert assignment.tolist() == [[0, 0, 0, 1, 1, 1]]
    centres, assignment = dpc_knn(LINE.view(1, 6, 1), clusters=3, k=3)
    assert centres.tolist() == [[1, 4, 5]]
    assert assignment.tolist() == [[0, 0, 0, 1, 1, 2]]


def loop_dpc_knn(points: torch.Tensor, clusters: int, k: int) -> tuple[list[int], list[int]]:
    n, channels = points.shape
    d = [[math.dist(points[i].tolist(), points[j].tolist()) / channels**0.5 for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in d]
    largest = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(n) if rho[j] > rho[i]], default=largest) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -rho[i] * delta[i])[:clusters]
    assignment = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: d[centres[c]][i]) for i in range(n)]
    return centres, assignment


def test_dpc_knn_equals_a_plain_loop_per_sample():
    torch.manual_seed(0)
    features = torch.randn(3, 20, 5)
    centres, assignment = dpc_knn(features, clusters=4, k=4)
    for b in range(3):
        expected_centres, expected_assignment = loop_dpc_knn(features[b].double(), 4, 4)
        assert centres[b].tolist() == expected_centres
        assert assignment[b].tolist() == expected_assignment
