"""The visual-token reduction contract on LLaVA-NeXT (AnyRes: thumbnail + 2-4 crops of 144 tokens, unpadding, newlines).

Prompts hold images of different sizes (different crop counts, hence different
placeholder counts), one sample holds two images. Expected packed sequences come
from the stock ``pack_image_features`` run on token ids (an oracle independent of
the adapter's packer).
"""

from __future__ import annotations

import copy

import llava_next_fixtures as nf
import pytest
import torch
import vlm_fixtures as vf
from test_vlm_contract import CASES as VLM_CASES

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.merge_slot import ViewsSite
from tokenreduce.methods.globalcom2.method import GlobalCom2, block_sums, crop_retention

CASES = {**{k: v for k, v in VLM_CASES.items() if k != "cdpruner"}, "globalcom2": (tr.GlobalCom2Config(ratio=0.0), tr.GlobalCom2Config(), None)}
PRUNING = ["fastervlm", "random", "uniform", "divprune", "vispruner"]  # kept tokens are stock tokens
SAMPLES = [(["wide2"], [7, 8], [9, 10, 11]), (["wide3", "square4"], [12], [13, 14]), (["square4"], [15, 16, 17, 18], [19])]
P = nf.VIEW_TOKENS


@pytest.fixture(scope="module")
def model():
    return nf.llava_next()


def names_of(samples):
    return [n for images, _, _ in samples for n in images]


def prompts_for(model, samples):
    lengths = dict(zip(nf.SIZES, nf.stock_lengths(model, list(nf.SIZES))))
    return [nf.prompt(before, after, [lengths[n] for n in images]) for images, before, after in samples]


def run(model, prompts, names, side="left", seed=0, images=None, **generate):
    ids, mask = nf.batch(prompts, side)
    pixels, sizes = images or nf.images(names, seed)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes, max_new_tokens=4,
                                do_sample=False, suppress_tokens=[nf.IMAGE_TOKEN], **generate)
    return logits, tokens[:, ids.shape[1]:]


def packed(model, names, seed=0):
    pixels, sizes = nf.images(names, seed)
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True).pooler_output)


def stock_ids(model, names):
    """Per image, the stock packed sequence as view * P + patch ids, -1 for a newline token."""
    sizes = nf.images(names)[1]
    ids = [torch.arange(nf.views(nf.SIZES[n]) * P, dtype=torch.float64).view(-1, P, 1) for n in names]
    order, _ = type(model.model).pack_image_features(model.model, ids, sizes, "default", torch.tensor([-1.0], dtype=torch.float64))
    return [o[:, 0].long() for o in order]


def expected_counts(model, names, survivors, per_view):
    """Packed length per image for ``per_view`` tokens per view, of which ``survivors`` [V_total, P] have a place."""
    counts, start = [], 0
    for order in stock_ids(model, names):
        views = int(order.max()) // P + 1
        alive = survivors[start : start + views].flatten()
        crop_part = order[P:]
        located = alive[crop_part.clamp_min(0)] & (crop_part >= 0)
        rows = torch.tensor_split(located, (crop_part == -1).nonzero()[:, 0].tolist())
        unplaced = sum(per_view - int(survivors[start + v].sum()) for v in range(1, views))
        counts.append(per_view + int(located.sum()) + sum(bool(r.any()) for r in rows) + unplaced)
        start += views
    return counts


@pytest.fixture(scope="module")
def prompts(model):
    return prompts_for(model, SAMPLES)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return run(model, prompts, names_of(SAMPLES))


def test_every_supported_method_has_a_case(model):
    """In-LLM methods (site "llm") run their contract in test_inllm_contract.py, staged ones (FiCoCo-VL) in test_ficoco_vl.py."""
    vision = {m for m in tr.supported(model) if registry.method_for_class(registry.config_class(m)).sites != {"llm"}} - {"ficoco_vl"}
    assert vision == {zero.method for zero, _, _ in CASES.values()}


def test_fixture_has_different_crop_counts(model):
    assert [nf.views(s) for s in nf.SIZES.values()] == [3, 4, 5]
    assert len(set(nf.stock_lengths(model, list(nf.SIZES)))) == 3


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(model, prompts, reference, case):
    stock = packed(model, names_of(SAMPLES))
    with tr.apply(model, CASES[case][0]) as handle:
        logits, tokens = run(model, prompts, names_of(SAMPLES))
        stats = handle.stats()
        features = packed(model, names_of(SAMPLES))
    assert all(torch.equal(a, b) for a, b in zip(features, stock))
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert stats["visual_tokens_out"] == stats["visual_tokens_in"] == [f.shape[0] for f in stock]


@pytest.mark.parametrize("case", list(CASES))
def test_active_keeps_budget_and_remove_restores(model, prompts, reference, case):
    names = names_of(SAMPLES)
    handle = tr.apply(model, CASES[case][1])
    logits, tokens = run(model, prompts, names)
    stats, survivors = handle.stats(), handle.surviving_patches()
    handle.remove()
    kept = stats["visual_tokens_out"]
    if case != "globalcom2":
        assert kept == expected_counts(model, names, survivors, CASES[case][2])
    full = stats["visual_tokens_in"]
    assert all(k < f for k, f in zip(kept, full))
    images_per_sample = [len(images) for images, _, _ in SAMPLES]
    cut = torch.tensor(full).split(images_per_sample), torch.tensor(kept).split(images_per_sample)
    width = max(map(len, prompts))  # left padding stays: each row loses its own surplus placeholders
    assert stats["sequence_out"] == [width - int(a.sum()) + int(b.sum()) for a, b in zip(*cut)]
    assert logits.shape[1] == max(stats["sequence_out"]) and torch.isfinite(logits).all()
    assert model.config.vision_config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"
    after = run(model, prompts, names)
    assert torch.equal(after[0], reference[0]) and torch.equal(after[1], reference[1])


@pytest.mark.parametrize("case", PRUNING)
def test_pruning_packs_exactly_the_stock_tokens_it_keeps(model, case):
    names = names_of(SAMPLES)
    stock = packed(model, names)
    with tr.apply(model, CASES[case][1]) as handle:
        features = packed(model, names)
        survivors = handle.surviving_patches()
    start = 0
    for got, full, order in zip(features, stock, stock_ids(model, names)):
        views = int(order.max()) // P + 1
        alive = survivors[start : start + views].flatten()
        keep = torch.where(order >= 0, alive[order.clamp_min(0)], False)
        lines = (order == -1).nonzero()[:, 0]
        row_starts = torch.cat([torch.tensor([P]), lines[:-1] + 1])
        keep[lines] = torch.tensor([bool(keep[s:e].any()) for s, e in zip(row_starts.tolist(), lines.tolist())])
        torch.testing.assert_close(got, full[keep], rtol=1e-5, atol=1e-6)
        start += views


@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_stock_model_fed_pruned_embeddings(model, prompts, case):
    names = names_of(SAMPLES)
    with tr.apply(model, CASES[case][1]):
        _, tokens = run(model, prompts, names)
        features = packed(model, names)
    counts = iter([f.shape[0] for f in features])
    short = []
    for (images, before, after) in SAMPLES:
        short.append(nf.prompt(before, after, [next(counts) for _ in images]))
    ids, mask = nf.batch(short)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == nf.IMAGE_TOKEN] = torch.cat(features).to(embeds.dtype)
        expected = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  suppress_tokens=[nf.IMAGE_TOKEN])
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("case", ["fastervlm", "tome", "divprune", "globalcom2"])
def test_cached_generate_equals_recomputation(model, prompts, case):
    with tr.apply(model, CASES[case][1]):
        _, cached = run(model, prompts, names_of(SAMPLES))
        _, recomputed = run(model, prompts, names_of(SAMPLES), use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", ["fastervlm", "visionzip", "divprune", "ficoco_v", "globalcom2"])
def test_padded_batch_of_different_sizes_equals_samples_one_by_one(model, prompts, case, side):
    with tr.apply(model, CASES[case][1]) as handle:
        pixels, sizes = nf.images(names_of(SAMPLES), seed=4)
        batch_logits, batch_tokens = run(model, prompts, None, side=side, images=(pixels, sizes))
        stats = handle.stats()
        removed = (torch.tensor(stats["visual_tokens_in"]) - torch.tensor(stats["visual_tokens_out"])).tolist()
        first = 0
        for i, (sample, prompt) in enumerate(zip(SAMPLES, prompts)):
            mine = slice(first, first + len(sample[0]))
            first += len(sample[0])
            logits, tokens = run(model, [prompt], None, images=(pixels[mine], sizes[mine]))
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            last = -1 if side == "left" else len(prompt) - sum(removed[mine]) - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


def test_globalcom2_at_full_retention_reproduces_stock_features(model):
    stock = packed(model, list(nf.SIZES), seed=3)
    with tr.apply(model, tr.GlobalCom2Config(ratio=0.0)):
        features = packed(model, list(nf.SIZES), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(features, stock))


def test_globalcom2_keeps_every_canvas_row_newline(model):
    with tr.apply(model, tr.GlobalCom2Config(ratio=0.9)):
        features = packed(model, list(nf.SIZES))
    newline = model.model.image_newline
    for got, order in zip(features, stock_ids(model, list(nf.SIZES))):
        assert int((got == newline).all(dim=-1).sum()) == int((order == -1).sum())
        assert not (got[: P // 10] == newline).all(dim=-1).any()  # thumbnail first, no newline in it


@pytest.mark.parametrize("retention", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_globalcom2_crop_budgets_average_to_retention_before_flooring(retention):
    generator = torch.Generator().manual_seed(int(retention * 100))
    for n in (2, 3, 4):
        scores = torch.randn(n, generator=generator) * 40  # wide spread: some crops are capped at 1 when R >= 0.5
        ratios = crop_retention(scores, retention, tau=10.0)
        assert float(ratios.mean()) == pytest.approx(retention, abs=1e-12)
        assert bool((ratios <= 1.0).all()) and bool((ratios > 0).all())
        uncapped = retention * (1 + (scores.double() / 10.0).softmax(0) - 1 / n)
        if bool((uncapped <= 1).all()):
            torch.testing.assert_close(ratios, uncapped)
        assert ratios[scores.argmax()] == ratios.max()  # the richest crop keeps the largest share


def views_site(scores, canvas, crop_grid, grid=(12, 12)):
    """A site whose [CLS] logits (one head, d = 1, scale 1) are exactly ``scores`` [V, P]."""
    views, patches = scores.shape
    q = torch.ones(views, 1, patches + 1, 1)
    k = torch.cat([torch.zeros(views, 1), scores], dim=1).view(views, 1, patches + 1, 1)
    return ViewsSite(features=torch.zeros(views, patches, 4), q=q, k=k, scale=1.0, has_cls=True, grid=grid,
                     crop_grid=crop_grid, canvas=canvas)


def test_globalcom2_budgets_and_guidance_on_a_known_canvas(model):
    with tr.apply(model, tr.GlobalCom2Config(ratio=0.75)) as handle:
        layout = handle.adapter.layout(torch.tensor(nf.SIZES["wide3"]), 4)  # 1 x 3 crops, padded rows removed
        method = handle.method
    scores = torch.randn(4, P, generator=torch.Generator().manual_seed(0))
    scores[1:] = 0.0  # crops' own scores are flat: the thumbnail's upsampled scores decide inside crops
    kept = method.plan_views(views_site(scores, layout.canvas, layout.crop_grid))
    assert kept[0].tolist() == scores[0].topk(36).indices.sort().values.tolist()
    ratios = crop_retention(block_sums(scores[0], (12, 12), (1, 3)), 0.25, 10.0)
    valid = torch.bincount(layout.canvas.flatten() // P, minlength=3)
    assert [len(k) for k in kept[1:]] == [int(v * r + 1e-9) for v, r in zip(valid.tolist(), ratios.tolist())]
    rows, cols = layout.canvas.shape
    upsampled = torch.nn.functional.interpolate(scores[0].view(1, 1, 12, 12), size=(rows, cols), mode="bilinear")[0, 0]
    for crop, chosen in enumerate(kept[1:]):
        on = layout.canvas // P == crop
        crop_scores = upsampled[on]  # row-major over this crop's canvas tokens == ascending patch order
        best = crop_scores.topk(len(chosen)).indices.sort().values
        assert chosen.tolist() == (layout.canvas[on] - crop * P)[best].tolist()


def test_globalcom2_on_plain_llava_is_refused_before_mutation():
    llava = vf.llava()
    ids, mask = vf.batch([vf.prompt([7], [8])])
    with torch.no_grad():
        before = llava(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(1)).logits
    with pytest.raises(tr.UnsupportedModelError, match=r"globalcom2 acts on \['anyres'\] sites but LlavaForConditionalGeneration"):
        tr.apply(llava, tr.GlobalCom2Config())
    assert tr.remove(llava) == 0 and "forward" not in llava.model.__dict__
    with torch.no_grad():
        assert torch.equal(llava(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(1)).logits, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 64}, r"GlobalCom2 keeps a fraction of every image .* give ratio in \[0, 1\)"),
    ({"ratio": None}, r"give ratio in \[0, 1\)"),
    ({"tau": 0.0}, r"tau=0.0 is invalid; expected a number in \(0.0, inf\]"),
    ({"alpha": 1.5}, r"alpha=1.5 is invalid"),
    ({"score": "mean"}, r"score='mean' is invalid; accepted: cls, neg_cos_to_mean"),
])
def test_globalcom2_config_errors(kwargs, message):
    with pytest.raises(tr.ConfigError, match=message):
        tr.GlobalCom2Config(**kwargs)


def test_globalcom2_cls_free_variant_runs(model, prompts):
    with tr.apply(model, tr.GlobalCom2Config(ratio=0.5, score="neg_cos_to_mean")) as handle:
        logits, _ = run(model, prompts, names_of(SAMPLES))
        kept, full = handle.stats()["visual_tokens_out"], handle.stats()["visual_tokens_in"]
    assert torch.isfinite(logits).all() and all(k < f for k, f in zip(kept, full))


def test_image_sizes_that_do_not_match_the_placeholders(model, prompts):
    ids, mask = nf.batch(prompts)
    pixels, sizes = nf.images(names_of(SAMPLES))
    with tr.apply(model, tr.FasterVLMConfig(keep=16)):
        with pytest.raises(ValueError, match=r"4 image\(s\) need 4 runs of \[696, 696, 440, 394\] image placeholder tokens, got \[394, 1136, 696\]"):
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes.flip(0))


def test_full_strategy_is_refused(model):
    config = copy.deepcopy(model.config)
    config.vision_feature_select_strategy = "full"
    other = type(model)(config).eval()
    with pytest.raises(tr.UnsupportedModelError, match=r"vision_feature_select_strategy='full'.*supports 'default' only"):
        tr.apply(other, tr.FasterVLMConfig(keep=16))


def test_prompt_without_image_is_a_no_op_with_a_stats_note(model):
    ids, mask = nf.batch([[nf.BOS, 7, 8, 9]])
    vf.assert_text_only_prompt_is_a_no_op(model, tr.GlobalCom2Config(), {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("case", ["globalcom2", "visionzip"])
def test_bf16(model, prompts, case):
    model = model.to(torch.bfloat16)
    try:
        ids, mask = nf.batch(prompts)
        pixels, sizes = nf.images(names_of(SAMPLES))
        with tr.apply(model, CASES[case][1]) as handle, torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(torch.bfloat16), image_sizes=sizes).logits
            kept, full = handle.stats()["visual_tokens_out"], handle.stats()["visual_tokens_in"]
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all() and all(k < f for k, f in zip(kept, full))
    finally:
        model.to(torch.float32)


def test_plan_views_single_view_keeps_floor_of_retention():
    method = GlobalCom2(tr.GlobalCom2Config(ratio=0.75), {"has_cls": True})
    scores = torch.randn(1, P, generator=torch.Generator().manual_seed(1))
    kept = method.plan_views(views_site(scores, torch.zeros(0, 0, dtype=torch.long), (0, 0)))
    assert len(kept) == 1 and kept[0].tolist() == scores[0].topk(36).indices.sort().values.tolist()


def test_cdpruner_needs_prompt_text_and_is_refused_before_mutation(model):
    forward = model.model.forward
    with pytest.raises(tr.UnsupportedModelError, match=r"needs \['prompt_text'\]"):
        tr.apply(model, tr.CDPrunerConfig(keep=16))
    assert model.model.forward == forward and "cdpruner" not in tr.supported(model)
