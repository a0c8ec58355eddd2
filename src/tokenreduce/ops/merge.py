"""Token plans and the one merge kernel.

A reduction step at one site is *filter -> correlate -> compress* (FiCoCo,
arXiv 2411.17686; DESIGN.md section 2). Filter and correlate produce a
:class:`TokenPlan`, an explicit, inspectable description of the step; compress is
:func:`apply_plan`, the single kernel every method uses:

    x_t <- (s_t x_t + sum_d a_dt s_d x_d) / (s_t + sum_d a_dt s_d),   s_t <- s_t + sum_d a_dt s_d

for every output token t and every folded token d with weight a_dt.

* ToMe (arXiv 2210.09461, eq. in sec. 3): a_dt = 1, sizes s carried forward.
* FiCoCo-V self-preserving compression (sec. 3.3, eq. 7): sizes reset to 1, weights a_dt.
* EViT's fused token (arXiv 2202.07800, sec. 3): an appended empty slot (s_t = 0)
  receiving every inattentive token with its [CLS] attention as weight.
* Spatial pooling: appended slots (s_t = 0), one per pooling cell, weight 1.
* Pure pruning: no folded tokens.

Shapes: B batch, N tokens before, K kept, E appended slots, M folded tokens,
T targets per folded token, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenPlan:
    """One reduction step for a batch.

    Attributes:
        keep: [B, K] long, indices of kept tokens in ascending (original) order.
        merge_src: [B, M] long, indices of discarded tokens folded into outputs.
            Discarded tokens not listed here are pruned.
        merge_dst: [B, M, T] long, output positions (0..K+E-1) receiving each folded token.
        merge_weight: [B, M, T] float, weights a_dt; 0 marks an unused target slot.
        new_tokens: E, empty slots appended after the kept tokens.
        new_positions: [B, E] long original-index labels of the appended slots
            (-1: no single location, e.g. EViT's fused token).
        additive: fold without normalising, x_t <- x_t + sum_d a_dt x_d (VisionZip's
            contextual tokens, arXiv 2412.04467 sec. 3.3: target plus its group mean).
        valid: [B, K+E] bool, None = every output is real. Adaptive-count methods
            (PruMerge's IQR outliers) keep a different number of tokens per sample;
            a batch stays rectangular by padding each row after its real kept tokens
            (see :func:`kept_first`), and whoever consumes the output drops the
            padding (DESIGN.md sec. 4.5: "adaptive-count methods re-pad").
    """

    keep: torch.Tensor
    merge_src: torch.Tensor | None = None
    merge_dst: torch.Tensor | None = None
    merge_weight: torch.Tensor | None = None
    new_tokens: int = 0
    new_positions: torch.Tensor | None = None
    additive: bool = False
    valid: torch.Tensor | None = None

    @property
    def num_out(self) -> int:
        """Tokens after the step."""
        return self.keep.shape[1] + self.new_tokens


def complement(discard: torch.Tensor, n: int) -> torch.Tensor:
    """[B, D] discarded indices -> [B, n-D] kept indices, ascending.

    A stable sort of the keep mask instead of ``nonzero``: no host sync on GPUs and
    it runs on the ``meta`` device (FLOP counting of large shapes).
    """
    dropped = torch.zeros(discard.shape[0], n, dtype=torch.uint8, device=discard.device)
    dropped.scatter_(1, discard, 1)
    return dropped.sort(dim=1, stable=True).indices[:, : n - discard.shape[1]]


def kept_first(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectangular keep indices for per-sample selections of different sizes.

    selected: [B, N] bool. Returns (keep [B, W], valid [B, W]) with W the largest
    selection in the batch: each row lists its selected tokens in ascending order,
    then pads with its unselected tokens (ascending), so indices stay unique per
    row; ``valid`` marks the real ones.
    """
    width = int(selected.sum(dim=1).max()) if selected.numel() else 0
    keep = (~selected).to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]
    return keep, torch.gather(selected, 1, keep)


def output_index(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Old -> new index table: [B, n] long, the output position of each kept token, -1 otherwise."""
    table = torch.full((keep.shape[0], n), -1, dtype=torch.long, device=keep.device)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return table.scatter_(1, keep, positions)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select tokens: x [B, N, *rest], index [B, K] -> [B, K, *rest].

    ``index_select`` on the flattened (B*N) axis: several times faster on CPU than
    ``torch.gather`` with an index expanded over the channels.
    """
    batch, n = x.shape[:2]
    flat = (index + torch.arange(batch, device=index.device).unsqueeze(1) * n).flatten()
    return x.reshape(batch * n, *x.shape[2:]).index_select(0, flat).view(*index.shape, *x.shape[2:])


def apply_plan(plan: TokenPlan, x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress: apply ``plan`` to hidden states x [B, N, C] with token sizes [B, N] (None = all 1).

    Returns the new hidden states [B, K+E, C] and sizes [B, K+E]. Weighted sums
    are accumulated in float32 (bf16 sums of many tokens lose precision) and cast
    back to x's dtype. A pure-pruning plan is an exact gather.
    """
    batch, _, channels = x.shape
    if sizes is None:
        sizes = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    out = gather_tokens(x, plan.keep)
    out_sizes = torch.gather(sizes, 1, plan.keep)
    if plan.new_tokens:
        out = torch.cat([out, out.new_zeros(batch, plan.new_tokens, channels)], dim=1)
        out_sizes = torch.cat([out_sizes, out_sizes.new_zeros(batch, plan.new_tokens)], dim=1)
    if plan.merge_src is None or plan.merge_src.shape[1] == 0:
        return out, out_sizes
    src_sizes = torch.gather(sizes, 1, plan.merge_src).float().unsqueeze(-1)
    weight = plan.merge_weight.float() * src_sizes  # [B, M, T]
    src = gather_tokens(x, plan.merge_src).float()  # [B, M, C]
    targets = plan.merge_dst.flatten(1)  # [B, M*T]
    index = targets.unsqueeze(-1).expand(-1, -1, channels)
    new_sizes = out_sizes.float().scatter_add(1, targets, weight.flatten(1))
    if plan.additive:
        contrib = (plan.merge_weight.float().unsqueeze(-1) * src.unsqueeze(2)).flatten(1, 2)
        return out.float().scatter_add(1, index, contrib).to(x.dtype), new_sizes.to(sizes.dtype)
    contrib = (weight.unsqueeze(-1) * src.unsqueeze(2)).flatten(1, 2)  # [B, M*T, C]
    acc = out.float() * out_sizes.float().unsqueeze(-1)
    acc.scatter_add_(1, index, contrib).div_(new_sizes.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return acc.to(x.dtype), new_sizes.to(sizes.dtype)


def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention (ToMe sec. 3, eq. 1): log(size) added to every query's logits, [B, 1, 1, N]."""
    return sizes.log().to(dtype)[:, None, None, :]


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] ascending indices of the True entries of a [B, N] bool mask with ``count`` True per row.

    A stable sort instead of ``nonzero``, like :func:`complement`: rectangular and no host sync.
    """
    return mask.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :count].sort(dim=1).values


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last True entry of each row of a [B, N] mask (rows need at least one True)."""
    return mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
