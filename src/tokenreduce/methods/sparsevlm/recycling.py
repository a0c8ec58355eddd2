"""SparseVLM v1.5's token recycling (arXiv 2410.04417, sec. 3.4; METHODS.md C3 step 4).

At each pruning cut the most relevant of the pruned visual tokens are not lost:
the top 30 % of them by the cut's score are clustered with DPC-kNN
(:func:`~tokenreduce.ops.clustering.dpc_knn`) and every cluster is averaged into
one token. Counts follow the official code exactly: ``int(0.3 * pruned) + 1``
candidates and ``int(candidates / 10) + 1`` clusters, with k (the density's
neighbours) equal to the number of clusters, on the hidden states leaving the
pruning layer.

Placement (library decision). The reference appends the merged tokens right after
the kept visual tokens and re-indexes every position. tokenreduce keeps original
RoPE positions and a cut never appends tokens, so each cluster is represented by
its centre (its density peak, always a member of its own cluster): the centre
survives at its own original position and its hidden state becomes the plain mean
of its cluster, through :func:`~tokenreduce.ops.merge.apply_plan` (unit sizes and
weights: (x_c + sum x_d) / (1 + |d|)). The recycled tokens are visual tokens from
then on (later cuts score, prune or recycle them like any other, as in the
reference) and they count in ``stats()`` (METHODS.md E4). Under
``positions="compact"`` the survivors are re-indexed in sequence order, so a centre
is numbered where it stands, not after the kept visual tokens as in the reference.
"""

from __future__ import annotations

import torch

from ...ops.clustering import dpc_knn
from ...ops.merge import TokenPlan, gather_tokens, output_index, true_indices
from ..inllm import top_visual


def recycled_count(pruned: int) -> tuple[int, int]:
    """(candidates, clusters) recycled from ``pruned`` visual tokens: int(0.3 p) + 1, then int(m / 10) + 1; (0, 0) if none."""
    if pruned <= 0:
        return 0, 0
    candidates = 3 * pruned // 10 + 1
    return candidates, candidates // 10 + 1


def with_recycling(visual: int, pruned: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cuts (layer, kept by pruning) of a prompt with ``visual`` tokens -> (layer, kept by pruning + recycled clusters).

    A cut that prunes nothing recycles nothing; a later cut prunes from what the
    earlier one left, recycled tokens included.
    """
    cuts, current = [], visual
    for layer, kept in pruned:
        current = kept + recycled_count(current - kept)[1] if kept < current else current
        cuts.append((layer, current))
    return cuts


def pruning_count(current: int, total: int) -> int:
    """The pruning count k of a cut from ``current`` to ``total`` visual tokens: k + clusters(current - k) = total.

    Two pruning counts can reach one total (pruning one token fewer may recycle one
    cluster fewer); the larger is taken, one more top-scored token instead of one
    more cluster, so the cut's size is what the schedule said either way.
    """
    for kept in range(total, -1, -1):
        if kept + (recycled_count(current - kept)[1] if kept < current else 0) == total:
            return kept
    raise ValueError(f"tokenreduce: no SparseVLM pruning count recycles {current} visual tokens into {total}")


def recycling_plan(hidden: torch.Tensor, scores: torch.Tensor, visual: torch.Tensor, kept: torch.Tensor) -> TokenPlan:
    """The cut with recycling: every non-visual token, the ``kept`` visual ones [B, K] and one centre per cluster.

    hidden: [B, N, C] the hidden states entering the cut; scores: [B, N] the cut's visual
    token scores; visual: [B, N] bool. Each non-centre candidate is folded into its
    cluster's centre with weight 1; the other pruned tokens are dropped.
    """
    batch, n = visual.shape
    pruned = visual.scatter(1, kept, False)
    candidates_count, clusters = recycled_count(int(visual[0].sum()) - kept.shape[1])
    candidates = top_visual(scores, pruned, candidates_count)  # [B, M]
    slots, assignment = dpc_knn(gather_tokens(hidden, candidates), clusters, k=clusters)
    centres = candidates.gather(1, slots)
    keep_mask = (~visual).scatter(1, kept, True).scatter(1, centres, True)
    keep = true_indices(keep_mask, n - int(visual[0].sum()) + kept.shape[1] + clusters)
    members = true_indices(torch.ones_like(candidates, dtype=torch.bool).scatter(1, slots, False), candidates_count - clusters)
    targets = centres.gather(1, assignment.gather(1, members))
    dst = output_index(keep, n).gather(1, targets)
    weight = torch.ones(batch, members.shape[1], 1, dtype=torch.float32, device=hidden.device)
    return TokenPlan(keep=keep, merge_src=candidates.gather(1, members), merge_dst=dst[..., None], merge_weight=weight)
