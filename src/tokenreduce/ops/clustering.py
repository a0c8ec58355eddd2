"""Clustering kernels: group tokens so that a group can be merged into one.

Batched over samples; every sample is clustered on its own.
"""

from __future__ import annotations

import torch


def dpc_knn(features: torch.Tensor, clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (DPC-kNN; Rodriguez & Laio, Science 2014, with the
    kNN density of Du et al., KBS 2016), as SparseVLM recycles pruned tokens (arXiv 2410.04417, sec. 3.4; official
    ``cluster_and_merge``, METHODS.md C3 step 4).

    features: [B, M, C]. With distances d_ij = ||x_i - x_j||_2 / sqrt(C):

    * density rho_i = exp(-mean of d_ij^2 over the k nearest points j, i itself included);
    * delta_i = distance to the nearest point of strictly higher density (the largest distance in
      the sample for a point that has none);
    * the ``clusters`` points with the largest rho_i * delta_i are the centres;
    * every point joins its nearest centre, and a centre always joins its own cluster.

    The reference adds uniform noise of 1e-6 to the densities to break ties; this kernel
    is deterministic (tied points do not count as denser than each other). Returns
    (centres [B, clusters] indices into M, in decreasing centre score; assignment [B, M],
    the cluster slot 0..clusters-1 of every point).
    """
    x = features.float()
    distance = torch.cdist(x, x) / x.shape[-1] ** 0.5  # [B, M, M]
    nearest = distance.topk(min(k, x.shape[1]), dim=-1, largest=False).values
    density = (-nearest.square().mean(dim=-1)).exp()  # [B, M]
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j is denser than i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    centres = (delta * density).topk(clusters, dim=-1).indices  # [B, clusters]
    assignment = torch.gather(distance, 1, centres[..., None].expand(-1, -1, x.shape[1])).argmin(dim=1)  # [B, M]
    slots = torch.arange(clusters, device=x.device).expand_as(centres)
    return centres, assignment.scatter(1, centres, slots)
