"""DPC-kNN written as plainly as possible (lists and loops), the oracle of the clustering kernel and of SparseVLM's recycling."""

from __future__ import annotations

import math

import torch


def loop_dpc_knn(points: torch.Tensor, clusters: int, k: int) -> tuple[list[int], list[int]]:
    """(centres in decreasing rho * delta, cluster slot of every point) of points [M, C]; see ``ops.clustering.dpc_knn``."""
    n, channels = points.shape
    d = [[math.dist(points[i].tolist(), points[j].tolist()) / channels**0.5 for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in d]
    largest = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(n) if rho[j] > rho[i]], default=largest) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -rho[i] * delta[i])[:clusters]
    assignment = [centres.index(i) if i in centres else min(range(clusters), key=lambda c: d[centres[c]][i]) for i in range(n)]
    return centres, assignment
