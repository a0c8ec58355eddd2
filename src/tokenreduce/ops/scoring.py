"""Token scores computed from a layer's queries and keys (score probes, METHODS.md sec. 0.4).

The model's own attention keeps running on SDPA; these functions recompute only
the rows a method needs from q and k captured at that layer. Shapes: q, k are
[B, H, N, d] (per head), ``scale`` is the layer's softmax scale (usually d**-0.5).
Scores are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch


def row_attention(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor | slice, *, probs: bool) -> torch.Tensor:
    """Head-mean attention of the chosen query rows over all keys: [B, R, N].

    ``probs=False`` gives pre-softmax logits q.k * scale, ``probs=True`` softmax
    probabilities. They rank alike per head, not after the mean over heads, so
    each method states which one its paper uses.
    """
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, R, N]
    values = logits.softmax(dim=-1) if probs else logits
    return values.mean(dim=1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Probe P1: softmax attention of the [CLS] query (token 0) over all tokens, head mean: [B, N]."""
    return row_attention(q, k, scale, slice(0, 1), probs=True)[:, 0]


def importance(q: torch.Tensor, k: torch.Tensor, scale: float, has_cls: bool) -> torch.Tensor:
    """Token importance [B, N]: [CLS] attention (P1) where token 0 is a [CLS], else attention received (P4).

    The [CLS]-free fallback follows VisionZip's port to SigLIP-style encoders (METHODS.md B1).
    """
    return cls_attention(q, k, scale) if has_cls else attention_received(q, k, scale)


def attention_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Probe P6: the full head-mean logit map [B, N, N]; only for ViT-sized N (a few hundred tokens)."""
    return row_attention(q, k, scale, slice(None), probs=False)


def mean_key_logits(k: torch.Tensor, scale: float) -> torch.Tensor:
    """[CLS]-free stand-in for the [CLS] row (FiCoCo v4, METHODS.md A3.7): logits of the mean key as query, [B, N]."""
    query = k.float().mean(dim=2, keepdim=True)  # [B, H, 1, d]
    return ((query @ k.float().transpose(-1, -2)) * scale).mean(dim=1)[:, 0]


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Probe P4: attention each token receives, sum over queries of softmax rows, head mean: [B, N].

    Queries are processed in chunks so the N x N map is never held at once.
    """
    total = k.new_zeros(k.shape[0], k.shape[2], dtype=torch.float32)
    kt = k.float().transpose(-1, -2)
    for start in range(0, q.shape[2], chunk):
        probs = ((q[:, :, start : start + chunk].float() @ kt) * scale).softmax(dim=-1)
        total += probs.sum(dim=2).mean(dim=1)
    return total


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """ToMe's similarity metric, the keys averaged over heads, up to scale: [B, N, d].

    Only cosine similarities of it are used, so the sum over heads serves and
    saves the division of ``mean``.
    """
    return k.sum(dim=1)


def l2_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Divide a [B, N] score vector by its L2 norm over tokens (FiCoCo's normalisation of each cue)."""
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def window_penalty(keep_score: torch.Tensor, cells: torch.Tensor, coefficient: float) -> torch.Tensor:
    """FiCoCo-V's local penalty (arXiv 2411.17686, sec. 3.2): spread discards over the grid.

    keep_score: [B, N] (higher = keep); cells: [B, N] long window id of each token
    (-1 = in no window). In every window the token with the lowest keep score is
    pushed further toward discard: divided by ``coefficient`` if positive,
    multiplied by it otherwise. Ties go to the earliest token.
    """
    batch, n = keep_score.shape
    in_window = cells >= 0
    slots = torch.where(in_window, cells, 0)
    num_cells = int(cells.max()) + 1 if in_window.any() else 0
    if num_cells == 0:
        return keep_score
    worst = keep_score.new_full((batch, num_cells), torch.inf).scatter_reduce(1, slots, keep_score.masked_fill(~in_window, torch.inf), "amin")
    is_worst = in_window & (keep_score == torch.gather(worst, 1, slots))
    index = torch.arange(n, device=keep_score.device).expand(batch, n)
    first = torch.full((batch, num_cells), n, device=keep_score.device).scatter_reduce(1, slots, index.masked_fill(~is_worst, n), "amin")
    chosen = is_worst & (index == torch.gather(first, 1, slots))
    penalised = torch.where(keep_score > 0, keep_score / coefficient, keep_score * coefficient)
    return torch.where(chosen, penalised, keep_score)


def grid_cells(positions: torch.Tensor, protected: int, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Window id of each token from its original index: [B, N] long, -1 for protected or appended tokens.

    ``positions`` holds original token indices (patches start at ``protected``);
    windows are non-overlapping ``window x window`` cells of the original grid.
    """
    width = grid[1]
    patch = positions - protected
    valid = (patch >= 0) & (positions >= 0)
    row, col = patch.div(width, rounding_mode="floor"), patch % width
    cells_per_row = -(-width // window)
    cell = row.div(window, rounding_mode="floor") * cells_per_row + col.div(window, rounding_mode="floor")
    return torch.where(valid, cell, -1)


def query_rows_attention(query_rows: torch.Tensor, key: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """Probe P2: softmax attention of chosen query rows over a decoder layer's keys, head mean: [B, R, N].

    query_rows: [B, H, R, d] (after RoPE); key: [B, H_kv, N, d] (after RoPE; grouped-query
    heads are expanded as ``repeat_kv`` does); valid: [B, R, N] bool, the keys each row may
    see (causal + padding). The softmax runs over the whole visible row before any
    restriction to visual columns, as an eager attention map would (METHODS.md sec. C).
    """
    key = key.float().repeat_interleave(query_rows.shape[1] // key.shape[1], dim=1)
    logits = (query_rows.float() @ key.transpose(-1, -2)) * scale  # [B, H, R, N]
    return logits.masked_fill(~valid.unsqueeze(1), -torch.inf).softmax(dim=-1).mean(dim=1)
