"""SparseVLM and FiCoCo-L against attention computed independently (eager attention / per-head logits, per sample, in loops).

The contract (identity at zero, remove, cache, padding, SDPA, bf16, bad configs) runs
for both in ``test_inllm_contract.py``; this file checks that their scores, selections
and merges are the cards' (METHODS.md C3, C5).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import vlm_fixtures as vf
from test_inllm_contract import deep_llava

import tokenreduce as tr
from tokenreduce.methods.ficoco.language import FiCoCoL
from tokenreduce.methods.sparsevlm import SparseVLM
from tokenreduce.ops.scoring import head_mean_logits, text_raters

TEXTS = [([7, 8], [9, 10, 11, 12]), ([12], [13, 14]), ([15, 16, 17, 18], [19, 20, 21])]


@pytest.fixture(scope="module")
def model():
    return deep_llava()


@pytest.fixture(scope="module")
def batch():
    return vf.batch([vf.prompt(before, after) for before, after in TEXTS])  # left padding


def unreduced(model, ids, mask, pixels, eager: bool = False):
    """The unreduced model's decoder input embeddings, hidden states and (eager) attentions."""
    captured = {}
    target = copy.deepcopy(model) if eager else model
    if eager:
        target.config.text_config._attn_implementation = "eager"
    language = target.model.language_model
    hook = language.register_forward_pre_hook(lambda _m, _a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = target(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True, output_attentions=eager)
    finally:
        hook.remove()
    return captured["embeds"], out.hidden_states, out.attentions


def instruction(ids, mask, b: int) -> list[int]:
    last_image = (ids[b] == vf.IMAGE_TOKEN).nonzero().max().item()
    return [t for t in range(last_image + 1, ids.shape[1]) if mask[b, t]]


def raters_of(embeds, ids, mask, b: int) -> torch.Tensor:
    """SparseVLM's raters of sample b: instruction tokens above the mean visual-to-text softmax relevance (all if none is)."""
    image = (ids[b] == vf.IMAGE_TOKEN).nonzero()[:, 0]
    text = torch.tensor(instruction(ids, mask, b))
    relevance = (embeds[b, image] @ embeds[b, text].T).softmax(dim=-1).mean(dim=0)
    return text[relevance > relevance.mean()] if (relevance > relevance.mean()).any() else text


def top_of(score: torch.Tensor, columns: torch.Tensor, k: int) -> list[int]:
    return sorted(columns[score[columns].topk(k).indices].tolist())


def test_sparsevlm_keeps_the_top_of_the_raters_eager_attention(model, batch):
    """Raters from the input embeddings, then the eager attention of layer 0 (2 of 32 scaled to 4 layers), rater- and head-mean."""
    ids, mask = batch
    pixels = vf.pixels(3, seed=7)
    embeds, _, attentions = unreduced(model, ids, mask, pixels, eager=True)
    expected = []
    for b in range(len(ids)):
        score = attentions[0][b][:, raters_of(embeds, ids, mask, b)].mean(dim=0).mean(dim=0)  # heads, then raters
        expected.append(top_of(score, (ids[b] == vf.IMAGE_TOKEN).nonzero()[:, 0], 100))
    with tr.apply(model, tr.SparseVLMConfig(schedule=(100, 50, 20), recycle=False)) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.stats()["kept"]
    assert kept[1] == expected
    assert all(set(later) <= set(earlier) for layer in (2, 3) for later, earlier in zip(kept[layer], kept[layer - 1]))


def test_sparsevlm_second_cut_scores_the_reduced_sequence_like_eager_attention_with_the_dropped_tokens_masked(model, batch):
    """After a cut, the raters' rows of layer 1 over the survivors equal eager attention at full length with dropped columns masked."""
    ids, mask = batch
    pixels = vf.pixels(3, seed=9)
    with tr.apply(model, tr.SparseVLMConfig(schedule=(100, 50, 20), recycle=False)) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.stats()["kept"]
    eager = copy.deepcopy(model)
    eager.config.text_config._attn_implementation = "eager"
    embeds, _, _ = unreduced(model, ids, mask, pixels)
    language = eager.model.language_model
    batch_size, length = ids.shape
    positions = torch.arange(length).expand(batch_size, length)
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    dropped = ids == vf.IMAGE_TOKEN
    for b, row in enumerate(kept[1]):
        dropped[b, row] = False
    weights = {}
    hook = language.layers[1].self_attn.register_forward_hook(lambda _m, _a, out: weights.update(layer1=out[1]))
    try:
        with torch.no_grad():
            rope = language.rotary_emb(embeds, position_ids=positions)
            hidden = language.layers[0](embeds, attention_mask=torch.where(allowed | torch.eye(length, dtype=torch.bool), 0.0, -torch.inf)[:, None],
                                        position_embeddings=rope, position_ids=positions)
            allowed = (allowed & ~dropped[:, None, :]) | torch.eye(length, dtype=torch.bool)
            language.layers[1](hidden, attention_mask=torch.where(allowed, 0.0, -torch.inf)[:, None], position_embeddings=rope, position_ids=positions)
    finally:
        hook.remove()
    for b in range(batch_size):
        score = weights["layer1"][b][:, raters_of(embeds, ids, mask, b)].mean(dim=0).mean(dim=0)
        assert kept[2][b] == top_of(score, torch.tensor(kept[1][b]), 50)


def test_sparsevlm_defaults_are_the_official_schedules():
    facts = {"num_layers": 32, "reducible_tokens": 576}
    pruning = {"recycle": False}
    assert SparseVLM(tr.SparseVLMConfig(**pruning), facts).cuts(576) == [(3, 300), (7, 200), (16, 110)]  # pruned after layers 2 / 6 / 15
    assert SparseVLM(tr.SparseVLMConfig(keep=128, **pruning), facts).cuts(576) == [(3, 303), (7, 110), (16, 36)]
    assert SparseVLM(tr.SparseVLMConfig(keep=64, **pruning), facts).cuts(576) == [(3, 66), (7, 30), (16, 17)]
    assert SparseVLM(tr.SparseVLMConfig(**pruning), {"num_layers": 4, "reducible_tokens": 144}).cuts(144) == [(1, 75), (2, 50), (3, 28)]


def ficoco_l_oracle(model, ids, mask, pixels, layer: int, r: int, additive: bool, task: str):
    """Hidden states entering layer ``layer + 1`` after FiCoCo-L's reduction scored by ``layer``, sample by sample."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, hidden_states, _ = unreduced(model, ids, mask, pixels)
    language = model.model.language_model
    block = language.layers[layer]
    attention = block.self_attn
    heads, kv_heads, dim = language.config.num_attention_heads, language.config.num_key_value_heads, attention.head_dim
    entering, leaving = hidden_states[layer], hidden_states[layer + 1]
    batch, length = ids.shape
    with torch.no_grad():
        normed = block.input_layernorm(entering)
        q = attention.q_proj(normed).view(batch, length, heads, dim).transpose(1, 2)
        k = attention.k_proj(normed).view(batch, length, kv_heads, dim).transpose(1, 2)
        cos, sin = language.rotary_emb(entering, position_ids=torch.arange(length).expand(batch, length))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    outputs, kept_columns = [], []
    for b in range(batch):
        logits = torch.stack([q[b, h] @ k[b, h // (heads // kv_heads)].T for h in range(heads)]).mean(dim=0) * dim**-0.5
        image = (ids[b] == vf.IMAGE_TOKEN).nonzero()[:, 0]
        text = torch.tensor(instruction(ids, mask, b))
        a_vv, a_vt, a_tv = logits[image][:, image], logits[image][:, text], logits[text][:, image]
        task_term = a_tv.mean(dim=0) if task == "text_to_visual" else a_vt.mean(dim=1)
        redundancy = 0.6 * a_vv.sum(dim=1) - 0.4 * task_term
        discard = redundancy.topk(r).indices.tolist()
        kept = [i for i in range(len(image)) if i not in discard]
        correlation = 0.6 * a_vv + 0.4 * a_vt @ a_tv
        x = leaving[b].clone()
        total = {j: torch.zeros_like(x[0]) for j in kept}
        weight = dict.fromkeys(kept, 0.0)
        for i in discard:
            row = correlation[i, kept]
            targets = (row > torch.quantile(row, 0.998)).nonzero()[:, 0]
            targets = targets if len(targets) else row.argmax().view(1)
            alphas = row[targets].softmax(dim=0)
            for t, alpha in zip(targets.tolist(), alphas):
                total[kept[t]] += alpha * leaving[b, image[i]]
                weight[kept[t]] += alpha
        for j in kept:
            merged = x[image[j]] + total[j]
            x[image[j]] = merged if additive else merged / (1 + weight[j])
        survivors = sorted(set(range(length)) - {image[i].item() for i in discard})
        outputs.append(x[survivors])
        kept_columns.append(image[kept].tolist())
    return torch.stack(outputs), kept_columns


@pytest.mark.parametrize("compress, task", [("self_preserving", "text_to_visual"), ("additive", "visual_to_text")])
def test_ficoco_l_merge_equals_an_independent_computation(model, batch, compress, task):
    ids, mask = batch
    pixels = vf.pixels(3, seed=8)
    expected, expected_kept = ficoco_l_oracle(model, ids, mask, pixels, layer=1, r=14, additive=compress == "additive", task=task)
    seen = {}
    with tr.apply(model, tr.FiCoCoLConfig(start_layer=0, compress=compress, task=task)) as handle:
        hook = model.model.language_model.layers[2].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        finally:
            hook.remove()
        kept = handle.stats()["kept"]
    assert kept[2] == expected_kept
    torch.testing.assert_close(seen["x"], expected, rtol=1e-4, atol=1e-5)


def test_ficoco_l_defaults_are_the_cards():
    config = tr.FiCoCoLConfig()
    assert (config.start_layer, config.beta, config.gamma, config.epsilon) == (4, 0.6, 0.6, 0.998)
    assert (config.task, config.compress) == ("text_to_visual", "self_preserving")
    cuts = FiCoCoL(config, {"num_layers": 32, "reducible_tokens": 576}).cuts(576)
    assert cuts == [(layer, 576 - 14 * (layer - 5)) for layer in range(6, 32)]  # scored by layers 5..30, r = 14
    budget = FiCoCoL(tr.FiCoCoLConfig(keep=198), {"num_layers": 32, "reducible_tokens": 576}).cuts(576)
    assert budget[-1] == (31, 198) and [576 - k for _, k in budget[:1]] == [15]  # 378 removed over 26 layers, remainder first


def test_head_mean_logits_equals_the_mean_of_per_head_logits_with_grouped_keys():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
    expected = torch.stack([q[:, h] @ k[:, h // 2].transpose(-1, -2) for h in range(4)]).mean(dim=0) * 0.5
    torch.testing.assert_close(head_mean_logits(q, k, 0.5), expected)


def test_text_raters_are_above_the_mean_relevance_and_all_text_when_none_is():
    visual = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    text = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True, False]])
    # softmax over (2, 0, 0) -> the first text token dominates; the padded one never rates
    assert text_raters(visual, text, valid).tolist() == [[True, False, False, False]]
    assert text_raters(visual, text[:, 1:3], valid[:, 1:3]).tolist() == [[True, True]]  # equal relevance: everyone rates


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
