"""Filter and correlate kernels: choose what to keep and where discarded tokens go.

Each returns indices in the current token order and is batched over samples
(decisions are per sample, never averaged over the batch).
"""

from __future__ import annotations

import torch

from .merge import TokenPlan, complement, gather_tokens, output_index, true_indices


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> TokenPlan:
    """ToMe's matching (arXiv 2210.09461, sec. 3 "Token Merging").

    Tokens alternate into sets A (even positions) and B (odd positions); each A
    token finds its most similar B token by cosine similarity of ``metric``
    [B, N, C] (the layer's mean-over-heads keys); the r A-tokens with the best
    matches are folded into their B partners with weight 1 (size-weighted average
    in :func:`apply_plan`). The first ``protected`` tokens ([CLS], registers) are
    never merged and never targets. Unlike the reference, survivors stay in their
    original order, so [CLS] stays at index 0 and grids stay readable.
    """
    batch, n, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # [B, |A|, |B|]
    a_protected = (protected + 1) // 2
    b_protected = protected // 2
    scores[:, :a_protected] = -torch.inf
    scores[:, :, :b_protected] = -torch.inf
    best_score, best_b = scores.max(dim=-1)  # [B, |A|]
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_a = order[:, :r]  # positions within A
    src = merged_a * 2  # current indices
    dst_current = torch.gather(best_b, 1, merged_a) * 2 + 1
    keep = complement(src, n)
    dst = torch.gather(output_index(keep, n), 1, dst_current)
    weight = torch.ones(batch, r, 1, dtype=torch.float32, device=metric.device)
    return TokenPlan(keep=keep, merge_src=src, merge_dst=dst.unsqueeze(-1), merge_weight=weight)


def max_bipartite_merges(n: int, protected: int) -> int:
    """How many tokens one ToMe step can remove from n tokens: |A| minus protected A tokens (0 if B has no unprotected token)."""
    if n // 2 <= protected // 2:
        return 0
    return (n + 1) // 2 - (protected + 1) // 2


def keep_top(scores: torch.Tensor, k: int, protected: int = 0) -> torch.Tensor:
    """Filter by score: the ``protected`` leading tokens plus the top-k of the rest, ascending order.

    scores: [B, N] (higher = keep). Returns [B, protected + k] long.
    """
    batch, n = scores.shape
    top = scores[:, protected:].topk(k, dim=-1).indices + protected
    head = torch.arange(protected, device=scores.device).expand(batch, protected)
    return torch.cat([head, top.sort(dim=-1).values], dim=1)


def quantile_targets(correlation: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FiCoCo's token-adaptive correlate (arXiv 2411.17686, sec. 3.2, eqs. 5-6).

    correlation: [B, D, M], each discarded token's scores over the M candidate targets.
    A token's targets are the candidates above the epsilon-quantile of its own row
    (at least its best one); weights are the softmax of its scores restricted to
    those targets, so they sum to 1. Returns (targets [B, D, T] into the M
    candidates, weights [B, D, T]) with T the largest target count in the batch;
    unused slots have weight 0.
    """
    scores = correlation.float()
    threshold = torch.quantile(scores, epsilon, dim=-1, keepdim=True)
    count = (scores > threshold).sum(dim=-1).clamp_min(1)  # [B, D]
    width = int(count.max()) if count.numel() else 1
    top_scores, top_index = scores.topk(width, dim=-1)
    valid = torch.arange(width, device=scores.device) < count.unsqueeze(-1)
    weights = torch.softmax(top_scores.masked_fill(~valid, -torch.inf), dim=-1)
    return top_index, weights


def quantile_fold(keep: torch.Tensor, n: int, candidates: torch.Tensor, correlation: torch.Tensor, epsilon: float) -> TokenPlan:
    """FiCoCo's correlate + compress plan (arXiv 2411.17686, eqs. 5-7), shared by FiCoCo-V and FiCoCo-L.

    keep: [B, K] ascending kept indices of n tokens; candidates: [B, M] the indices a
    discarded token may fold into; correlation: [B, n-K, M], the scores of each
    discarded token (``complement(keep, n)`` order) over the candidates. Targets and
    weights come from :func:`quantile_targets`; every discarded token is folded.
    """
    slots, weights = quantile_targets(correlation, epsilon)
    targets = torch.gather(candidates.unsqueeze(1).expand(-1, correlation.shape[1], -1), 2, slots)
    return plan_fold(keep, n, targets, weights)


def plan_prune(keep: torch.Tensor) -> TokenPlan:
    """A plan that keeps ``keep`` and drops every other token."""
    return TokenPlan(keep=keep)


def plan_fold(keep: torch.Tensor, n: int, targets: torch.Tensor, weights: torch.Tensor) -> TokenPlan:
    """Fold every discarded token into kept tokens.

    keep: [B, K] ascending kept indices; targets: [B, N-K, T] current indices of
    each discarded token's targets (discarded tokens in ascending order); weights:
    [B, N-K, T].
    """
    table = output_index(keep, n)
    discard = complement(keep, n)
    dst = torch.gather(table, 1, targets.flatten(1)).view_as(targets)
    return TokenPlan(keep=keep, merge_src=discard, merge_dst=dst, merge_weight=weights)


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection (arXiv 2503.02175, sec. 3, Alg. 1).

    features: [B, N, C]. Distances are cosine distances. The first token is the one
    farthest from its nearest neighbour; each next one maximises its minimum
    distance to the tokens already chosen. Returns [B, k] ascending indices.
    """
    batch, n, _ = features.shape
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = 1.0 - unit @ unit.transpose(-1, -2)  # [B, N, N]
    nearest = distance + torch.eye(n, device=features.device) * torch.finfo(torch.float32).max
    chosen = torch.empty(batch, k, dtype=torch.long, device=features.device)
    if k == 0:
        return chosen
    chosen[:, 0] = nearest.min(dim=-1).values.argmax(dim=-1)
    closest = torch.gather(distance, 1, chosen[:, :1, None].expand(-1, 1, n)).squeeze(1)  # [B, N]
    taken = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    taken.scatter_(1, chosen[:, :1], True)
    for step in range(1, k):
        pick = closest.masked_fill(taken, -torch.inf).argmax(dim=-1)
        chosen[:, step] = pick
        taken.scatter_(1, pick[:, None], True)
        closest = torch.minimum(closest, torch.gather(distance, 1, pick[:, None, None].expand(-1, 1, n)).squeeze(1))
    return chosen.sort(dim=-1).values


def deduplicate(features: torch.Tensor, target: int, per_round: int) -> torch.Tensor:
    """VisPruner's diverse set (arXiv 2412.01818, sec. 3.3): iterative ToMe-style de-duplication.

    features: [B, R, C]. Each round splits the remaining tokens alternately into A
    and B, scores every A token by its highest cosine similarity to B and removes
    up to ``per_round`` of the most duplicated A tokens, until ``target`` remain.
    Returns [B, target] ascending indices into the R tokens.
    """
    batch, count = features.shape[:2]
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    left = torch.arange(count, device=features.device).expand(batch, count)
    while left.shape[1] > target:
        current = gather_tokens(unit, left)
        a, b = current[:, 0::2], current[:, 1::2]
        duplicated = (a @ b.transpose(-1, -2)).max(dim=-1).values  # [B, |A|]
        drop = min(per_round, left.shape[1] - target, a.shape[1])
        dropped = duplicated.topk(drop, dim=-1).indices * 2  # positions within ``left``
        left = torch.gather(left, 1, complement(dropped, left.shape[1]))
    return left


def nearest_neighbours(metric: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """The k tokens most cosine-similar to each anchor, the anchor itself excluded: [B, A, k] indices into N.

    metric: [B, N, C] (e.g. keys); anchors: [B, A] indices. LLaVA-PruMerge's
    correlate step (arXiv 2403.15388, sec. 3.3): every kept token gathers its
    key-nearest neighbours among all other tokens, kept or not.
    """
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = gather_tokens(unit, anchors) @ unit.transpose(-1, -2)  # [B, A, N]
    similarity.scatter_(2, anchors.unsqueeze(-1), -torch.inf)
    return similarity.topk(k, dim=-1).indices


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference for a determinantal point process (Chen, Zhang & Zhou, NeurIPS 2018, Alg. 1).

    kernel: [B, N, N] positive semi-definite L. Each step adds the item j that
    maximises log det(L_Y+j), which is the item with the largest residual
    d_j^2 = L_jj - |c_j|^2 of the incremental Cholesky factorisation of L_Y; the
    rows c and residuals d of all items are then updated in O(N * step) instead of
    recomputing determinants. CDPruner (arXiv 2506.10967, sec. 3.4) selects its
    visual tokens this way. Once the kernel's rank is exhausted every residual is
    ~0; the remaining picks then follow the residuals without further updates.
    Returns [B, k] ascending indices.
    """
    batch, n, _ = kernel.shape
    kernel = kernel.float()
    rows = torch.arange(batch, device=kernel.device)
    factors = kernel.new_zeros(k, batch, n)  # c_i of every item, one Cholesky column per step
    residual = kernel.diagonal(dim1=1, dim2=2).clone()  # d_j^2
    chosen = torch.empty(batch, k, dtype=torch.long, device=kernel.device)
    tiny = torch.finfo(torch.float32).eps
    for step in range(k):
        pick = residual.argmax(dim=-1)
        chosen[:, step] = pick
        gain = residual[rows, pick]
        update = kernel[rows, pick] - torch.einsum("sb,sbn->bn", factors[:step, rows, pick], factors[:step])
        column = torch.where(gain.unsqueeze(-1) > tiny, update / gain.clamp_min(tiny).sqrt().unsqueeze(-1), 0.0)
        factors[step] = column
        residual = residual - column.square()
        residual[rows, pick] = -torch.inf
    return chosen.sort(dim=-1).values


def least_duplicated(pivots: torch.Tensor, candidates: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """DART's duplication-based selection (arXiv 2502.11494, sec. 3.2; official ``get_retained_image_token``).

    pivots: [B, P, C]; candidates: [B, M, C]; picks: [B, P] long, how many candidates
    pivot p takes in sample b (0 for a pivot a sample lacks); every row of ``picks``
    must have the same sum T. Pivots take turns in order; each takes the candidates
    *least* cosine-similar to it among those not taken yet, so the kept tokens are the
    ones the pivots duplicate least. Returns [B, T] ascending indices into the M candidates.
    """
    unit_c = candidates.float() / candidates.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    unit_p = pivots.float() / pivots.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    similarity = unit_p @ unit_c.transpose(-1, -2)  # [B, P, M]
    taken = torch.zeros(candidates.shape[:2], dtype=torch.bool, device=candidates.device)
    most = int(picks.max()) if picks.numel() else 0
    for p in range(pivots.shape[1]):
        order = similarity[:, p].masked_fill(taken, torch.inf).argsort(dim=-1, stable=True)[:, :most]
        wanted = torch.arange(order.shape[1], device=order.device) < picks[:, p : p + 1]
        taken.scatter_(1, order, wanted | taken.gather(1, order))
    return true_indices(taken, int(picks[0].sum()))
