"""clustering: DPC-kNN on a hand-computed example and against a plain per-sample loop."""

from __future__ import annotations

import torch
from clustering_oracle import loop_dpc_knn

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


def test_dpc_knn_equals_a_plain_loop_per_sample():
    torch.manual_seed(0)
    features = torch.randn(3, 20, 5)
    centres, assignment = dpc_knn(features, clusters=4, k=4)
    for b in range(3):
        expected_centres, expected_assignment = loop_dpc_knn(features[b].double(), 4, 4)
        assert centres[b].tolist() == expected_centres
        assert assignment[b].tolist() == expected_assignment
