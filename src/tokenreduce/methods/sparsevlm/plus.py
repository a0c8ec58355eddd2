"""SparseVLM+'s visual token scores (the v2.0 mode; METHODS.md C3, official ``USE_VERSION=2_0`` code).

Two changes to v1.5's rater attention, both applied before the head and rater means:

* Attention gravity correction: RoPE alone makes a query attend more to nearby keys.
  The per-head softmax attention of every rater to every key is divided by the logits
  the positions alone produce (:func:`~tokenreduce.ops.scoring.rope_only_logits`:
  all-ones q and k rotated by the layer's RoPE, scaled by 1/sqrt(d)). As in the
  reference, the numerator is the softmax probability and the denominator the
  pre-softmax RoPE-only logit, which may be small or negative for some distances;
  we keep that definition.
* Text-visual priority heads: only the ``min(14, H)`` heads with the largest corrected
  rater-to-visual mass (sum over raters and visual columns) are averaged. The
  reference ranks heads on sample 0 of the batch; we rank them per sample
  (convention 0.5.7).
"""

from __future__ import annotations

import torch

PRIORITY_HEADS = 14


def gravity_corrected(probs: torch.Tensor, rope_only: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """probs [B, H, R, N] / rope_only [B, R, N] on the visual columns [B, N], 0 elsewhere: [B, H, R, N]."""
    return (probs / rope_only[:, None]).masked_fill(~visual[:, None, None, :], 0.0)


def priority_heads_mean(corrected: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's priority heads of the corrected attention [B, H, R, N]: [B, R, N].

    weight: [B, R], the rater rows (0 for padding rows), so the head mass counts raters only.
    """
    batch, heads, rows, n = corrected.shape
    mass = (corrected * weight[:, None, :, None]).sum(dim=(2, 3))  # [B, H]
    chosen = mass.topk(min(PRIORITY_HEADS, heads), dim=-1).indices
    return corrected.gather(1, chosen[:, :, None, None].expand(-1, -1, rows, n)).mean(dim=1)
