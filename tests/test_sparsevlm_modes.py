"""SparseVLM's two modes against independent computations (METHODS.md C3): v1.5 recycling and SparseVLM+ (v2).

The contract (zero strength, stats, cache, padding, bf16) runs for both modes in
``test_inllm_contract.py`` (cases ``sparsevlm``, ``sparsevlm_pruning``, ``sparsevlm_v2``).
"""

from __future__ import annotations

import torch
import vlm_fixtures as vf
from clustering_oracle import loop_dpc_knn
from test_inllm_more import batch, model, raters_of, top_of, unreduced  # noqa: F401  (batch and model: the module's fixtures)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tokenreduce as tr
from tokenreduce.methods.sparsevlm import SparseVLM, plus
from tokenreduce.methods.sparsevlm.recycling import recycled_count


def run_capturing_layer(model, ids, mask, pixels, config, layer: int) -> tuple[dict, dict]:
    """Run ``config``; return (stats()["kept"], the hidden states and position ids entering decoder layer ``layer``)."""
    seen = {}

    def capture(_module, args, kwargs):
        seen.update(x=args[0] if args else kwargs["hidden_states"], positions=kwargs["position_ids"])

    with tr.apply(model, config) as handle:
        hook = model.model.language_model.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        finally:
            hook.remove()
        return handle.stats()["kept"], seen


def test_recycling_counts_follow_the_reference():
    assert recycled_count(0) == (0, 0)
    assert recycled_count(1) == (1, 1)
    assert recycled_count(44) == (14, 2)  # int(0.3 * 44) + 1 = 14 candidates, int(14 / 10) + 1 = 2 clusters
    assert recycled_count(276) == (83, 9)  # 576 -> 300 at layer 2 of LLaVA-1.5-7B


def test_recycling_keeps_each_cluster_mean_at_its_centre(model, batch):
    """Layer 0 scores (eager, rater- and head-mean); the top 100 survive; of the 44 pruned, the 14 best are clustered
    (DPC-kNN, k = clusters = 2) on the hidden states leaving layer 0; each centre carries its cluster's mean at its own position."""
    ids, mask = batch
    pixels = vf.pixels(3, seed=7)
    embeds, hidden_states, attentions = unreduced(model, ids, mask, pixels, eager=True)
    kept, seen = run_capturing_layer(model, ids, mask, pixels, tr.SparseVLMConfig(schedule=(100, 50, 20)), layer=1)
    leaving = hidden_states[1]
    positions = seen["positions"].expand(len(ids), -1)
    for b in range(len(ids)):
        image = (ids[b] == vf.IMAGE_TOKEN).nonzero()[:, 0]
        score = attentions[0][b][:, raters_of(embeds, ids, mask, b)].mean(dim=0).mean(dim=0)
        top = top_of(score, image, 100)
        candidates = top_of(score, torch.tensor(sorted(set(image.tolist()) - set(top))), 14)
        centres, assignment = loop_dpc_knn(leaving[b, candidates].double(), 2, 2)
        centre_columns = [candidates[c] for c in centres]
        assert kept[1][b] == sorted(top + centre_columns)
        survivors = sorted(set(range(ids.shape[1])) - set(image.tolist()) | set(top) | set(centre_columns))
        expected = leaving[b, survivors].clone()
        for slot, centre in enumerate(centre_columns):
            members = [column for column, s in zip(candidates, assignment) if s == slot]
            expected[survivors.index(centre)] = leaving[b, members].mean(dim=0)
        real = mask[b, survivors].bool()  # padding rows differ between eager and SDPA
        torch.testing.assert_close(seen["x"][b][real], expected[real], rtol=1e-5, atol=1e-6)
        assert positions[b].tolist() == survivors  # original positions (no position_ids given: 0..L-1)


def test_v2_scores_the_gravity_corrected_attention_of_the_priority_heads(model, batch, monkeypatch):
    """Eager per-head attention of the raters at layer 0, divided by the logits of all-ones q / k rotated by the
    model's RoPE, mean over the 2 heads (of 4) with the most rater-to-visual mass, then over raters."""
    monkeypatch.setattr(plus, "PRIORITY_HEADS", 2)
    ids, mask = batch
    pixels = vf.pixels(3, seed=11)
    embeds, _, attentions = unreduced(model, ids, mask, pixels, eager=True)
    language = model.model.language_model
    batch_size, length = ids.shape
    heads, dim = language.config.num_attention_heads, language.config.head_dim
    cos, sin = language.rotary_emb(embeds, position_ids=torch.arange(length).expand(batch_size, length))
    ones = torch.ones(batch_size, heads, length, dim)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    rope_only = (q @ k.transpose(-1, -2)) / dim**0.5  # [B, H, L, L]
    expected = []
    for b in range(batch_size):
        raters = raters_of(embeds, ids, mask, b)
        image = (ids[b] == vf.IMAGE_TOKEN).nonzero()[:, 0]
        corrected = attentions[0][b][:, raters][:, :, image] / rope_only[b][:, raters][:, :, image]  # [H, R, V]
        priority = corrected.sum(dim=(1, 2)).topk(2).indices
        score = corrected[priority].mean(dim=0).mean(dim=0)
        expected.append(sorted(image[score.topk(100).indices].tolist()))
    kept, _ = run_capturing_layer(model, ids, mask, pixels, tr.SparseVLMConfig(mode="v2", schedule=(100, 50, 20)), layer=1)
    assert kept[1] == expected


def test_modes_defaults_and_schedules():
    facts = {"num_layers": 32, "reducible_tokens": 576}
    assert tr.SparseVLMConfig().mode == "v1.5" and tr.SparseVLMConfig().recycles
    assert not tr.SparseVLMConfig(mode="v2").recycles and not tr.SparseVLMConfig(recycle=False).recycles
    assert SparseVLM(tr.SparseVLMConfig(mode="v2"), facts).cuts(576) == [(3, 300), (7, 200), (16, 118)]
    assert SparseVLM(tr.SparseVLMConfig(mode="v2", keep=128), facts).cuts(576) == [(3, 238), (7, 108), (16, 60)]
    assert SparseVLM(tr.SparseVLMConfig(mode="v2", keep=64), facts).cuts(576) == [(3, 66), (7, 34), (16, 20)]
    # v1.5 recycles on top of the schedule: 276 pruned -> 83 -> 9; 109 -> 33 -> 4; 94 -> 29 -> 3
    assert SparseVLM(tr.SparseVLMConfig(), facts).cuts(576) == [(3, 309), (7, 204), (16, 113)]


def test_pruning_count_inverts_the_recycled_cut_size():
    """select() recovers the pruning count from the cut's size: every size a pruning count reaches maps back to one reaching it."""
    from tokenreduce.methods.sparsevlm.recycling import pruning_count, with_recycling

    for current in (20, 144, 576):
        for kept in range(1, current + 1):
            total = with_recycling(current, [(1, kept)])[0][1]
            back = pruning_count(current, total)
            assert back >= kept and with_recycling(current, [(1, back)])[0][1] == total
