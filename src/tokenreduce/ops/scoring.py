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
    if not probs:  # one matmul over the concatenated heads: no [B, H, R, N] map (FiCoCo-V's N x N, P6)
        return head_mean_logits(q[:, :, rows], k, scale)
    return ((q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale).softmax(dim=-1).mean(dim=1)


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


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, 1, N, H*d]: the heads concatenated into one, as the q_proj / k_proj outputs are.

    LLaVA-PruMerge (arXiv 2403.15388, code) hooks the projections and scores
    "single-head style" over the full channel width; pair this with the scale
    (H*d)**-0.5 to reproduce it with :func:`cls_attention`.
    """
    return t.transpose(1, 2).flatten(2).unsqueeze(1)


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence per row: [B, N] bool, True where a score exceeds Q3 + 1.5 (Q3 - Q1).

    LLaVA-PruMerge's adaptive selection (arXiv 2403.15388, sec. 3.2): the [CLS]
    attention is sparse, so its outliers are the informative tokens and their
    number adapts to the image. Quartiles interpolate linearly, as the
    reference's ``numpy.percentile``.
    """
    values = scores.float()
    quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device), dim=-1)  # [2, B]
    fence = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return values > fence.unsqueeze(-1)


def text_relevance(visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """CDPruner's instruction relevance (arXiv 2506.10967, sec. 3.3), min-max normalised per sample: [B, N].

    visual: [B, N, C]; text: [B, T, C] in the same space (the LLM's input
    embeddings of the prompt, as the OpenVINO GenAI port does); text_mask: [B, T]
    bool, the text tokens to average over. A visual token's relevance is the
    **negated** mean cosine similarity to the text tokens; the reference (and TRIM)
    negate deliberately, kept here. A row without text, or with equal scores
    everywhere, gets relevance 1 for every token (no conditioning).
    """
    unit_v = visual.float() / visual.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_t = text.float() / text.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    weight = text_mask.float()
    count = weight.sum(dim=-1, keepdim=True)  # [B, 1]
    raw = -((unit_v @ unit_t.transpose(-1, -2)) * weight.unsqueeze(1)).sum(dim=-1) / count.clamp_min(1.0)
    low, high = raw.min(dim=-1, keepdim=True).values, raw.max(dim=-1, keepdim=True).values
    spread = high - low
    scaled = (raw - low) / spread.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where((count > 0) & (spread > 0), scaled, torch.ones_like(raw))


def query_rows_attention(query_rows: torch.Tensor, key: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """Probe P2: softmax attention of chosen query rows over a decoder layer's keys, head mean: [B, R, N].

    The mean over heads of :func:`query_rows_head_attention`.
    """
    return query_rows_head_attention(query_rows, key, scale, valid).mean(dim=1)


def query_rows_head_attention(query_rows: torch.Tensor, key: torch.Tensor, scale: float, valid: torch.Tensor) -> torch.Tensor:
    """Probe P2 per head: softmax attention of chosen query rows over a decoder layer's keys, [B, H, R, N].

    query_rows: [B, H, R, d] (after RoPE); key: [B, H_kv, N, d] (after RoPE; grouped-query
    heads are expanded as ``repeat_kv`` does); valid: [B, R, N] bool, the keys each row may
    see (causal + padding). The softmax runs over the whole visible row before any
    restriction to visual columns, as an eager attention map would (METHODS.md sec. C).
    """
    key = key.float().repeat_interleave(query_rows.shape[1] // key.shape[1], dim=1)
    logits = (query_rows.float() @ key.transpose(-1, -2)) * scale  # [B, H, R, N]
    return logits.masked_fill(~valid.unsqueeze(1), -torch.inf).softmax(dim=-1)


def rope_only_logits(rows: torch.Tensor, columns: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention logits positions alone produce, [B, R, N], from all-ones q and k rotated by the layer's RoPE.

    rows [B, R, d] / columns [B, N, d]: all-ones vectors at the query rows' and key
    columns' positions, rotated by the model's own RoPE function (the caller's job, so
    that no rotation layout is assumed here). SparseVLM+'s "attention gravity"
    (METHODS.md C3, official v2.0 code): the positional bias that the text-to-visual
    attention is divided by.
    """
    return (rows.float() @ columns.float().transpose(-1, -2)) * scale


def head_mean_logits(query_rows: torch.Tensor, key_columns: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean pre-softmax, pre-mask logits of chosen query rows over chosen key columns: [B, R, C].

    query_rows: [B, H, R, d]; key_columns: [B, H_kv, C, d] (grouped-query heads expanded
    as ``repeat_kv`` does). The mean over heads of q_h . k_h equals one dot product of
    the heads concatenated, divided by H, so no per-head [B, H, R, C] map is formed.
    FiCoCo-L's blocks (arXiv 2411.17686, sec. 3.3; METHODS.md C5.1) are these logits.
    """
    heads = query_rows.shape[1]
    key_columns = key_columns.repeat_interleave(heads // key_columns.shape[1], dim=1)
    return (merge_heads(query_rows.float())[:, 0] @ merge_heads(key_columns.float())[:, 0].transpose(-1, -2)) * (scale / heads)


def text_raters(visual: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (arXiv 2410.04417, sec. 3.2; official v1.5 code): [B, T] bool.

    visual: [B, V, C] and text: [B, T, C] are the LLM's input embeddings; text_valid
    [B, T] marks real text. Each visual token's dot products with the text tokens
    are softmaxed over the text, the result is averaged over the visual tokens, and
    the text tokens above the mean of that relevance are the raters. Where no token
    is above the mean (one text token, or all equal) every valid text token rates.
    """
    logits = (visual.float() @ text.float().transpose(-1, -2)).masked_fill(~text_valid[:, None], -torch.inf)
    relevance = logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=1)  # [B, T]
    mean = (relevance * text_valid).sum(dim=-1, keepdim=True) / text_valid.sum(dim=-1, keepdim=True).clamp_min(1)
    raters = text_valid & (relevance > mean)
    return torch.where(raters.any(dim=-1, keepdim=True), raters, text_valid)
