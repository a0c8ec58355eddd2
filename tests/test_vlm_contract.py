"""The contract of visual-token reduction on multimodal LLMs (LLaVA-1.5 fixtures with 144 image tokens)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import vlm_fixtures as vf

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.methods.staged import Staged

CASES = {
    "tome": (tr.ToMeConfig(ratio=0.0), tr.ToMeConfig(keep=48), 48),
    "evit": (tr.EViTConfig(ratio=0.0), tr.EViTConfig(keep=16), 16),
    "ficoco_v": (tr.FiCoCoVConfig(ratio=0.0), tr.FiCoCoVConfig(keep=16), 16),
    "random": (tr.RandomConfig(ratio=0.0), tr.RandomConfig(keep=16), 16),
    "uniform": (tr.UniformConfig(ratio=0.0), tr.UniformConfig(keep=16), 16),
    "pooling": (tr.PoolingConfig(ratio=0.0), tr.PoolingConfig(keep=16), 16),
    "fastervlm": (tr.FasterVLMConfig(ratio=0.0), tr.FasterVLMConfig(keep=16), 16),
    "visionzip": (tr.VisionZipConfig(ratio=0.0), tr.VisionZipConfig(keep=32), 32),
    "divprune": (tr.DivPruneConfig(ratio=0.0), tr.DivPruneConfig(keep=16), 16),
    "vispruner": (tr.VisPrunerConfig(ratio=0.0), tr.VisPrunerConfig(keep=16), 16),
    "prumerge": (tr.PruMergeConfig(ratio=0.0), tr.PruMergeConfig(keep=16), 16),
    "prumerge_plus": (tr.PruMergePlusConfig(ratio=0.0), tr.PruMergePlusConfig(keep=16), 16),
    "cdpruner": (tr.CDPrunerConfig(ratio=0.0), tr.CDPrunerConfig(keep=16), 16),
}
MAKE_NEW_TOKENS = {"evit", "pooling", "visionzip", "prumerge", "prumerge_plus"}  # a fused / pooled / contextual / collecting token is no surviving patch
FIXTURES = {"llava": lambda: vf.llava(), "llava_full_last": lambda: vf.llava(feature_layer=-1, strategy="full")}
TEXTS = [([7, 8], [9, 10, 11]), ([12], [13, 14]), ([15, 16, 17, 18], [19])]


def test_every_registered_method_has_a_vlm_case():
    """Methods acting inside the LLM shorten no placeholders; test_inllm_contract.py covers them, test_ficoco_vl.py the staged ones."""
    covered = {zero.method for zero, _, _ in CASES.values()}
    single_site = {m for m in tr.supported(vf.llava()) if not issubclass(registry.method_for_class(registry.config_class(m)), Staged)}
    pre_llm = {m for m in single_site if registry.method_for_class(registry.config_class(m)).sites != {"llm"}}
    assert covered == pre_llm


@pytest.fixture(scope="module", params=list(FIXTURES))
def model(request):
    return FIXTURES[request.param]()


@pytest.fixture(scope="module")
def prompts(model):
    return [vf.prompt(before, after, per_image=vf.placeholders(model)) for before, after in TEXTS]


def run(model, prompts, pixels, side="left", **generate):
    return vf.logits_and_tokens(model, prompts, pixels, side, **generate)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return run(model, prompts, vf.pixels(3))


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(model, prompts, reference, case):
    with tr.apply(model, CASES[case][0]) as handle:
        logits, tokens = run(model, prompts, vf.pixels(3))
        stats = handle.stats()
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert stats["visual_tokens_out"] == [vf.placeholders(model)] * 3


@pytest.mark.parametrize("case", list(CASES))
def test_active_keeps_budget_and_remove_restores(model, prompts, reference, case):
    handle = tr.apply(model, CASES[case][1])
    logits, tokens = run(model, prompts, vf.pixels(3))
    stats = handle.stats()
    handle.remove()
    keep = CASES[case][2] + vf.placeholders(model) - vf.IMAGE_TOKENS  # [CLS] reaches the LLM with the "full" strategy
    assert stats["visual_tokens_out"] == [keep] * 3
    assert stats["sequence_out"] == [len(prompts[0]) - vf.placeholders(model) + keep] * 3
    assert logits.shape[1] == len(prompts[0]) - vf.placeholders(model) + keep and torch.isfinite(logits).all()
    assert model.config.vision_config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"
    after = run(model, prompts, vf.pixels(3))
    assert torch.equal(after[0], reference[0]) and torch.equal(after[1], reference[1])


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_stock_model_fed_pruned_embeddings(model, prompts, case, positions):
    """"original": the stock model also gets every kept token's position in the full prompt (a visual token's is its
    patch's placeholder, reported in stats()["visual_slots"]); "compact": no position ids, the short prompt counts 0..L'-1."""
    pixels = vf.pixels(3)
    keep = CASES[case][2] + vf.placeholders(model) - vf.IMAGE_TOKENS
    with tr.apply(model, dataclasses.replace(CASES[case][1], positions=positions)) as handle:
        tokens, logits = vf.generate_with_logits(model, *vf.batch(prompts), pixel_values=pixels)
        slots = handle.stats()["visual_slots"]
        with torch.no_grad():  # the visual tokens of a forward with the same prompts (CDPruner's selection depends on them)
            ids, mask = vf.batch(prompts)
            features = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).image_hidden_states
    starts = [p.index(vf.IMAGE_TOKEN) for p in prompts]
    kept = [[i for i, t in enumerate(p) if t != vf.IMAGE_TOKEN or i - start < keep] for p, start in zip(prompts, starts)]
    ids, mask = vf.batch([[p[i] for i in columns] for p, columns in zip(prompts, kept)])
    extra = {}
    if positions == "original":
        original = [[start + image_slots[i - start] if p[i] == vf.IMAGE_TOKEN else i for i in columns]
                    for p, columns, start, image_slots in zip(prompts, kept, starts, slots)]
        extra["position_ids"] = vf.batch(original)[0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == vf.IMAGE_TOKEN] = features.to(embeds.dtype)
    expected_tokens, expected_logits = vf.generate_with_logits(model, None, mask, inputs_embeds=embeds, **extra)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c not in MAKE_NEW_TOKENS])
def test_original_positions_equal_masking_out_the_removed_patches(model, prompts, case):
    """Without position ids, a prefill and a hand-driven cached decode step equal the stock model that keeps every
    placeholder column (so every position) and masks out the columns of the removed patches."""
    pixels = vf.pixels(3)
    ids, mask = vf.batch(prompts)
    step, step_mask = torch.full((len(prompts), 1), 9), torch.ones(len(prompts), 1, dtype=mask.dtype)
    with tr.apply(model, CASES[case][1]) as handle, torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        features, alive = prefill.image_hidden_states, handle.surviving_patches()  # as the prompt selected them (CDPruner)
        decode = model(input_ids=step, attention_mask=torch.cat([mask, step_mask], 1), past_key_values=prefill.past_key_values)
    if vf.placeholders(model) > vf.IMAGE_TOKENS:  # [CLS] has the first placeholder
        alive = torch.cat([torch.ones_like(alive[:, :1]), alive], dim=1)
    image = ids == vf.IMAGE_TOKEN
    kept = image.clone()
    kept[image] = alive.reshape(-1)
    masked = mask.masked_fill(image & ~kept, 0)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[kept] = features
        expected = model(inputs_embeds=embeds, attention_mask=masked)
        expected_decode = model(input_ids=step, attention_mask=torch.cat([masked, step_mask], 1),
                                past_key_values=expected.past_key_values)
    torch.testing.assert_close(prefill.logits[:, -1], expected.logits[:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decode.logits, expected_decode.logits, rtol=1e-4, atol=1e-5)


def test_positions_mode_is_validated(model):
    with pytest.raises(tr.ConfigError, match=r"positions='first' is invalid; accepted: original, compact"):
        tr.RandomConfig(keep=16, positions="first")
    tower = model.model.vision_tower
    with pytest.raises(tr.ConfigError, match=r"positions='compact' does not apply to CLIPVisionModel; accepted here: original"):
        tr.apply(tower, tr.RandomConfig(keep=16, positions="compact"))
    assert tr.remove(tower) == 0


@pytest.mark.parametrize("case", list(CASES))
def test_cached_generate_equals_recomputation(model, prompts, case):
    with tr.apply(model, CASES[case][1]):
        _, cached = run(model, prompts, vf.pixels(3))
        _, recomputed = run(model, prompts, vf.pixels(3), use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", ["fastervlm", "ficoco_v", "divprune", "visionzip", "prumerge_plus", "cdpruner"])
def test_padded_batch_equals_samples_one_by_one(model, prompts, case, side):
    pixels = vf.pixels(3, seed=4)
    with tr.apply(model, CASES[case][1]):
        batch_logits, batch_tokens = run(model, prompts, pixels, side=side)
        for i, prompt in enumerate(prompts):
            logits, tokens = run(model, [prompt], pixels[i : i + 1])
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            last = -1 if side == "left" else len(prompt) - vf.IMAGE_TOKENS + CASES[case][2] - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


def test_prompt_without_image_is_a_no_op_with_a_stats_note(model):
    ids, mask = vf.batch([[vf.BOS, 7, 8, 9]])
    vf.assert_text_only_prompt_is_a_no_op(model, tr.FasterVLMConfig(keep=16), {"input_ids": ids, "attention_mask": mask})


def test_mismatched_images_and_placeholders(model):
    ids, mask = vf.batch([vf.prompt([7], [8], images=2, per_image=vf.placeholders(model))])
    with tr.apply(model, tr.FasterVLMConfig(keep=16)):
        with pytest.raises(ValueError, match=r"3 image\(s\) need 3 runs of 14[45] image placeholder tokens, got \[2(88|90)\]"):
            model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(3))


def test_keep_larger_than_image_tokens(model):
    with pytest.raises(tr.ConfigError, match=r"keep=200 is larger than the 144 reducible tokens"):
        tr.apply(model, tr.FasterVLMConfig(keep=200))
    assert tr.remove(model) == 0


def test_a_layer_other_than_the_feature_layer_is_refused_at_the_feature_layer_site(model):
    """Random/uniform/pooling reduce the feature layer's output; another block would have been a silent no-op."""
    with pytest.raises(tr.ConfigError, match=r"RandomConfig: layer=0 is not where this site reduces; it reduces the output of block \d"):
        tr.apply(model, tr.RandomConfig(keep=16, layer=0))
    assert tr.remove(model) == 0


def test_bf16(model, prompts):
    model = model.to(torch.bfloat16)
    try:
        with tr.apply(model, tr.VisionZipConfig(keep=32)) as handle:
            logits, tokens = run(model, prompts, vf.pixels(3).to(torch.bfloat16))
            assert handle.stats()["visual_tokens_out"] == [32 + vf.placeholders(model) - vf.IMAGE_TOKENS] * 3
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    finally:
        model.to(torch.float32)


def adaptive_pixels():
    """Three images whose IQR outlier counts differ on the fixtures (checked in the test)."""
    pixels = vf.pixels(3, seed=1)
    pixels[1] *= 0.1
    pixels[2] = pixels[2].abs()
    return pixels


@pytest.mark.parametrize("config", [tr.PruMergeConfig(), tr.PruMergePlusConfig()], ids=["prumerge", "prumerge_plus"])
def test_adaptive_counts_per_image_batch_equals_samples_and_stock_model(model, prompts, config):
    """Compact positions, so the stock model fed the trimmed embeddings alone is the oracle (original positions: see
    test_generate_equals_stock_model_fed_pruned_embeddings)."""
    pixels = adaptive_pixels()
    with tr.apply(model, dataclasses.replace(config, positions="compact")) as handle:
        batch_logits, batch_tokens = run(model, prompts, pixels)
        counts = handle.stats()["visual_tokens_out"]
        with torch.no_grad():
            real = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        for i, prompt in enumerate(prompts):
            logits, tokens = run(model, [prompt], pixels[i : i + 1])
            assert torch.equal(tokens[0], batch_tokens[i])
            torch.testing.assert_close(logits[0, -1], batch_logits[i, -1], rtol=1e-4, atol=1e-5)
    assert len(set(counts)) > 1 and all(1 < c < vf.IMAGE_TOKENS for c in counts)
    assert [f.shape[0] for f in real] == counts
    short = [[t for j, t in enumerate(p) if t != vf.IMAGE_TOKEN or j - p.index(vf.IMAGE_TOKEN) < c] for p, c in zip(prompts, counts)]
    ids, mask = vf.batch(short)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == vf.IMAGE_TOKEN] = torch.cat(real)
        expected = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  suppress_tokens=[vf.IMAGE_TOKEN])
    assert torch.equal(batch_tokens, expected)


def test_prumerge_plan_matches_the_reference_loop():
    """PruMerge's merge, transcribed from the reference's per-token loop, against plan + apply_plan."""
    from tokenreduce.merge_slot import Site
    from tokenreduce.methods.prumerge import PruMerge
    from tokenreduce.ops.merge import apply_plan

    g = torch.Generator().manual_seed(0)
    batch, heads, n, d = 2, 2, 50, 4
    x, q, k = torch.randn(batch, n, 6, generator=g), torch.randn(batch, heads, n, d, generator=g), torch.randn(batch, heads, n, d, generator=g)
    q[:, :, 0] *= 3  # a peaked [CLS] row, so that there are outliers
    method = PruMerge(tr.PruMergeConfig(neighbours=5), {"num_layers": 1, "default_layer": 0, "reducible_tokens": n - 1})
    site = Site(x=x, q=q, k=k, scale=d**-0.5, positions=torch.arange(n).expand(batch, n), sizes=None, protected=1, has_cls=True,
                grid=(7, 7), layer=0, remove=1)
    plan = method.plan(site)
    out, _ = apply_plan(plan, x)
    for b in range(batch):
        qf, kf = q[b].transpose(0, 1).flatten(1), k[b].transpose(0, 1).flatten(1)  # [N, H*d], the projections' outputs
        attn = ((qf[0] @ kf.T) * (heads * d) ** -0.5).softmax(-1)[1:]
        q1, q3 = torch.quantile(attn, 0.25), torch.quantile(attn, 0.75)
        idx = sorted((attn > q3 + 1.5 * (q3 - q1)).nonzero()[:, 0].tolist())
        keys = torch.nn.functional.normalize(kf[1:], dim=-1)
        feats = x[b, 1:]
        expected = [x[b, 0]]
        for i in idx:
            others = [j for j in range(n - 1) if j != i]
            cluster = (keys[i] @ keys[others].T).topk(5).indices
            members = torch.tensor(others)[cluster]
            expected.append(feats[i] + (feats[members] * attn[members, None]).sum(0))
        rest = [j for j in range(n - 1) if j not in idx]
        expected.append((feats[rest] * attn[rest, None]).sum(0))
        real = out[b] if plan.valid is None else out[b][plan.valid[b]]
        assert 2 < len(idx) < n // 2
        torch.testing.assert_close(real, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_cdpruner_sees_each_images_own_prompt(model, prompts, monkeypatch):
    from tokenreduce.methods.cdpruner import CDPruner

    seen = []
    original = CDPruner.plan
    monkeypatch.setattr(CDPruner, "plan", lambda self, site: seen.append(site) or original(self, site))
    ids, mask = vf.batch(prompts)
    with tr.apply(model, tr.CDPrunerConfig(keep=16)):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(3))
    (site,) = seen
    embed = model.get_input_embeddings()
    for b, prompt in enumerate(prompts):
        text = torch.tensor([t for t in prompt if t != vf.IMAGE_TOKEN])
        assert torch.equal(site.text[b][site.text_mask[b]], embed(text))
