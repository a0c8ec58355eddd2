"""FiCoCo-VL (METHODS.md C6.1): FiCoCo-V in the vision tower and FiCoCo-L in the LLM under one apply.

LLaVA fixture with a 4-layer Llama decoder and 144 image tokens: FiCoCo-V keeps 40
patches, FiCoCo-L then removes 10 at each of its two cuts (decoder layers 2 and 3).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types

import pytest
import qwen_vl_fixtures as qf
import torch
import vlm_fixtures as vf
import llava_next_fixtures as nf
from test_inllm_contract import LAYERS, TEXTS, assert_detached, deep_llava, next_batch, record_selection, replay_selection
from transformers.modeling_utils import AttentionInterface
from transformers.models.clip.modeling_clip import CLIPAttention

import tokenreduce as tr
from tokenreduce import bench, registry
from tokenreduce.methods.staged import Staged

ZERO = tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(r=0), language=tr.FiCoCoLConfig(start_layer=0, r=0))
ACTIVE = tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(keep=40), language=tr.FiCoCoLConfig(start_layer=0, r=10))
VISION_KEEP, PER_LAYER = 40, [40, 40, 30, 20]


def run(model, prompts, pixels, side="left", **generate):
    """Positions skip left padding in the forward too, as in the in-LLM contract."""
    return vf.logits_and_tokens(model, prompts, pixels, side, count_positions=True, **generate)


def untouched(model, prompts, reference):
    assert_detached(model)
    assert torch.equal(run(model, prompts, vf.pixels(3))[0], reference[0])


@pytest.fixture(scope="module")
def model():
    return deep_llava()


@pytest.fixture(scope="module")
def prompts():
    return [vf.prompt(before, after) for before, after in TEXTS]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return run(model, prompts, vf.pixels(3))


def language_stage(handle) -> types.SimpleNamespace:
    """A handle-like view of the FiCoCo-L stage, for the record / replay helpers of the in-LLM contract."""
    return types.SimpleNamespace(method=handle.method.stage("language"), stats=lambda: handle.stats()["language"])


def restored(model, prompts, reference):
    """Nothing of either stage is left: no shadowed forward or encoder, no hook or probe, the same logits."""
    assert not {"forward", "get_image_features"} & set(model.model.__dict__) and "generate" not in model.__dict__
    untouched(model, prompts, reference)


def test_staged_methods_are_covered_here():
    """test_vlm_contract.py and test_inllm_contract.py cover single-site methods; every staged one LLaVA takes is here."""
    staged = {m for m in tr.supported(vf.llava()) if issubclass(registry.method_for_class(registry.config_class(m)), Staged)}
    assert staged == {"ficoco_vl"}


def test_defaults_are_each_cards_and_the_config_round_trips_through_json():
    config = tr.FiCoCoVLConfig()
    assert config.vision == tr.FiCoCoVConfig(r=42) and config.language == tr.FiCoCoLConfig()  # METHODS.md C6.2
    assert (config.language.r, config.language.start_layer) == (None, 4)
    for config in (tr.FiCoCoVLConfig(), ACTIVE):
        assert tr.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bench_sweeps_take_it_with_its_defaults_only():
    """One keep / ratio budget does not say how to split between the stages; no V/L split solver exists (METHODS.md C6.1)."""
    assert bench.sweep_configs(["ficoco_vl"], [], [], {}) == [tr.FiCoCoVLConfig()]
    assert not bench.takes_budget("ficoco_vl") and bench.takes_budget("ficoco_l")
    with pytest.raises(tr.ConfigError, match=r"ficoco_vl take\(s\) no single keep / ratio budget"):
        bench.sweep_configs(["ficoco_l", "ficoco_vl"], [64], [], {})
    assert bench._budget_label(ACTIVE.to_dict()) == "vision:keep=40 language:r=10"


def test_zero_strength_is_bit_exact(model, prompts, reference):
    with tr.apply(model, ZERO) as handle:
        logits, tokens = run(model, prompts, vf.pixels(3))
        stats = handle.stats()
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert stats["vision"]["visual_tokens_out"] == [vf.IMAGE_TOKENS] * 3
    assert stats["language"]["visual_tokens_per_layer"] == [vf.IMAGE_TOKENS] * LAYERS and stats["language"]["kept"] == {}
    restored(model, prompts, reference)


def test_active_reports_both_stages_and_remove_restores(model, prompts, reference):
    ids, mask = vf.batch(prompts)
    with tr.apply(model, ACTIVE) as handle:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(3), use_cache=True)
        stats = handle.stats()
        _, tokens = run(model, prompts, vf.pixels(3))
    shortened = ids.shape[1] - vf.IMAGE_TOKENS + VISION_KEEP
    assert stats["stages"] == ["vision", "language"]
    assert stats["visual_tokens_in"] == vf.IMAGE_TOKENS and stats["visual_tokens_out"] == [PER_LAYER[-1]] * 3
    assert stats["vision"]["vision"]["tokens_per_layer"] == [vf.IMAGE_TOKENS + 1, VISION_KEEP + 1]  # [CLS] + patches per tower layer
    assert stats["vision"]["visual_tokens_out"] == [VISION_KEEP] * 3 and stats["vision"]["sequence_out"] == [shortened] * 3
    assert stats["language"]["visual_tokens_in"] == VISION_KEEP and stats["language"]["visual_tokens_per_layer"] == PER_LAYER
    assert stats["language"]["sequence_per_layer"] == [shortened - VISION_KEEP + v for v in PER_LAYER]
    assert stats["language"]["equivalent_tokens"] == sum(PER_LAYER) / LAYERS
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == stats["language"]["sequence_per_layer"]
    assert out.logits.shape[1] == stats["language"]["sequence_per_layer"][-1] and torch.isfinite(out.logits).all()
    assert not torch.equal(tokens, reference[1]) or not torch.equal(out.logits[:, -1], reference[0][:, -1])
    restored(model, prompts, reference)
    assert torch.equal(run(model, prompts, vf.pixels(3))[1], reference[1])


def test_composite_equals_ficoco_v_then_ficoco_l_applied_one_after_the_other(model, prompts):
    """Reference: FiCoCo-V alone, recording what its shrinker hands LlavaModel.forward; then FiCoCo-L alone on exactly that."""
    ids, mask = vf.batch(prompts)
    pixels = vf.pixels(3, seed=7)
    with tr.apply(model, ACTIVE) as handle:
        with torch.no_grad():
            composite = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        kept = handle.stats()["language"]["kept"]
    recorded = {}
    with tr.apply(model, ACTIVE.vision):
        shrinker = model.model.forward
        forward = shrinker.original
        shrinker.original = lambda **kwargs: recorded.update(kwargs) or forward(**kwargs)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert recorded["input_ids"].shape[1] == ids.shape[1] - vf.IMAGE_TOKENS + VISION_KEEP
    with tr.apply(model, ACTIVE.language) as handle:
        with torch.no_grad():
            two_step = model.lm_head(model.model(**recorded).last_hidden_state)
        assert handle.stats()["kept"] == kept
    assert torch.equal(composite, two_step)


def test_a_visual_token_keeps_its_patch_position_through_both_stages(model):
    """At the last decoder layer each surviving visual token sits at the placeholder column of the patch it came from."""
    before, after = [7, 8], [9, 10, 11]
    ids, mask = vf.batch([vf.prompt(before, after)])
    start = 1 + len(before)  # first image placeholder; the text before it is never cut
    seen = {}
    language = model.model.language_model
    with tr.apply(model, ACTIVE) as handle:
        hook = language.layers[-1].register_forward_pre_hook(lambda _m, args, kwargs: seen.update(kwargs, hidden=args[0]), with_kwargs=True)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(1, seed=8))
        finally:
            hook.remove()
        stats = handle.stats()
    slots = stats["vision"]["visual_slots"][0]  # patch of each token FiCoCo-V handed on, in the shortened prompt
    survivors = stats["language"]["kept"][LAYERS - 1][0]  # their columns in the shortened prompt
    expected = [*range(start), *(start + slots[column - start] for column in survivors),
                *range(ids.shape[1] - len(after), ids.shape[1])]
    assert seen["position_ids"][0].tolist() == expected
    cos, sin = language.rotary_emb(seen["hidden"], position_ids=torch.tensor([expected]))
    assert torch.equal(seen["position_embeddings"][0], cos) and torch.equal(seen["position_embeddings"][1], sin)


def test_cached_generate_equals_recomputation_with_the_same_kept_set(model, prompts):
    with tr.apply(model, ACTIVE) as handle:
        recorded = record_selection(language_stage(handle))
        _, cached = run(model, prompts, vf.pixels(3))
        replay_selection(language_stage(handle), recorded)
        _, recomputed = run(model, prompts, vf.pixels(3), use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_samples_one_by_one(model, prompts, side):
    pixels = vf.pixels(3, seed=4)
    width = max(map(len, prompts))
    removed = vf.IMAGE_TOKENS - PER_LAYER[-1]
    with tr.apply(model, ACTIVE) as handle:
        batch_logits, batch_tokens = run(model, prompts, pixels, side=side)
        batch = handle.stats()
        for i, prompt in enumerate(prompts):
            logits, tokens = run(model, [prompt], pixels[i : i + 1])
            single = handle.stats()
            offset = width - len(prompt) if side == "left" else 0
            assert batch["vision"]["visual_slots"][i] == single["vision"]["visual_slots"][0]
            kept = {layer: [[c - offset for c in rows[i]]] for layer, rows in batch["language"]["kept"].items()}
            assert kept == single["language"]["kept"]
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            last = -1 if side == "left" else len(prompt) - removed - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


def test_every_layer_attends_once_through_sdpa(model, prompts, monkeypatch):
    sdpa = AttentionInterface._global_mapping["sdpa"]
    language = model.model.language_model
    decoder_attention = {layer.self_attn: i for i, layer in enumerate(language.layers)}
    tower_attention = {m for m in model.model.vision_tower.modules() if isinstance(m, CLIPAttention)}
    decoder_calls, tower_calls = [], set()

    def counting_sdpa(module, *args, **kwargs):
        if module in decoder_attention:
            decoder_calls.append(decoder_attention[module])
        tower_calls.update({module} & tower_attention)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    ids, mask = vf.batch(prompts)
    with tr.apply(model, ACTIVE):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(3))
    assert decoder_calls == list(range(LAYERS)) and tower_calls == tower_attention
    assert model.config.vision_config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"


def test_bf16(model, prompts):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    pixels = vf.pixels(3).to(torch.bfloat16)
    reference = run(bf16, prompts, pixels)
    with tr.apply(bf16, ZERO):
        zero = run(bf16, prompts, pixels)
    with tr.apply(bf16, ACTIVE) as handle:
        logits, _ = run(bf16, prompts, pixels)
        assert handle.stats()["language"]["visual_tokens_per_layer"] == PER_LAYER
    assert torch.equal(zero[0], reference[0]) and torch.equal(zero[1], reference[1])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_model_without_a_vit_and_an_llm_site_is_refused_untouched():
    model = qf.qwen2_vl()
    assert "ficoco_vl" not in tr.supported(model)
    with pytest.raises(tr.UnsupportedModelError, match=r"ficoco_vl acts on \['vit\+llm'\] sites .* methods for this model: "):
        tr.apply(model, ACTIVE)
    assert tr.remove(model) == 0 and "forward" not in model.model.__dict__


def test_applying_twice_is_refused(model, prompts, reference):
    with tr.apply(model, ACTIVE):
        with pytest.raises(tr.AlreadyAppliedError, match=r"already has 'ficoco_vl' attached"):
            tr.apply(model, ACTIVE)
        with pytest.raises(tr.AlreadyAppliedError):
            tr.apply(model, tr.FiCoCoLConfig(start_layer=0))
    restored(model, prompts, reference)


@pytest.mark.parametrize("config, message", [
    (lambda: tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(r=-1)), r"FiCoCoVConfig: r=-1 is invalid"),
    (lambda: tr.FiCoCoVLConfig(language=tr.FiCoCoLConfig(beta=2.0)), r"FiCoCoLConfig: beta=2.0 is invalid"),
    (lambda: tr.FiCoCoVLConfig(vision=tr.FiCoCoLConfig()),
     r"FiCoCoVLConfig: vision=FiCoCoLConfig\(.*\) is invalid; expected a FiCoCoVConfig"),
    (lambda: tr.FiCoCoVLConfig(language=None), r"FiCoCoVLConfig: language=None is invalid; expected a FiCoCoLConfig"),
])
def test_bad_stage_configs_are_refused(config, message):
    with pytest.raises(tr.ConfigError, match=message):
        config()


def test_the_language_budget_is_solved_against_what_the_vision_stage_leaves(model, prompts):
    """T_eq 64 is out of FiCoCo-L's reach on 144 tokens (cuts from layer 2 of 4) but not on the 96 FiCoCo-V leaves."""
    config = tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(keep=96), language=tr.FiCoCoLConfig(start_layer=0, equivalent_tokens=64))
    with tr.apply(model, config) as handle:
        run(model, prompts, vf.pixels(3))
        stats = handle.stats()
    assert stats["language"]["visual_tokens_in"] == 96 and stats["equivalent_tokens"] == stats["language"]["equivalent_tokens"]
    assert 63 <= stats["equivalent_tokens"] <= 64  # the largest schedule not above the target
    with pytest.raises(tr.ConfigError, match=r"equivalent_tokens=20 is out of reach for this prompt \(96 visual tokens\)"):
        with tr.apply(model, dataclasses.replace(config, language=tr.FiCoCoLConfig(start_layer=0, equivalent_tokens=20))):
            run(model, prompts, vf.pixels(3))


@pytest.mark.parametrize("config, message", [
    (lambda: tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(keep=40)),
     r"FiCoCoVLConfig.language: FiCoCoLConfig: start_layer=4 leaves no layer to reduce in this 4-layer decoder"),
    (lambda: tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(keep=40, start_layer=5), language=ACTIVE.language),
     r"FiCoCoVLConfig.vision: FiCoCoVConfig: layers 5..1 are not a valid range"),
    (lambda: tr.FiCoCoVLConfig(language=tr.FiCoCoLConfig(start_layer=0, positions="compact")),
     r"FiCoCoVLConfig: the stages must share one positions mode; got vision.positions='original', language.positions='compact'"),
])
def test_stage_configs_this_model_cannot_run_leave_it_untouched(model, prompts, reference, config, message):
    with pytest.raises(tr.ConfigError, match=message):
        tr.apply(model, config())
    restored(model, prompts, reference)


def test_a_visual_report_for_another_length_than_the_decoder_gets_is_refused(model, prompts, reference):
    """What a pre-hook before the shrinker would report (the full prompt) must not reach a shortened decoder silently."""
    ids, mask = vf.batch(prompts)
    with tr.apply(model, ACTIVE) as handle:
        handle._run.runs["language"].expect_visual(ids == vf.IMAGE_TOKEN)
        short = ids[:, : ids.shape[1] - vf.IMAGE_TOKENS + VISION_KEEP]
        with pytest.raises(RuntimeError, match=r"visual tokens of a 150-token prompt but the decoder got 46 tokens"):
            with torch.no_grad():
                model.model.language_model(input_ids=short)
    restored(model, prompts, reference)


def test_on_llava_next_zero_is_bit_exact_and_a_batch_of_different_crop_grids_equals_its_samples():
    """AnyRes: FiCoCo-V reduces every view, so each sample reaches the decoder with its own count (a ragged batch)."""
    vlm = next_batch(nf.llava_next(layers=LAYERS))
    with tr.apply(vlm.model, ZERO):
        logits, tokens = vlm.run()
    assert torch.equal(logits, vlm.reference[0]) and torch.equal(tokens, vlm.reference[1])
    active = tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(ratio=0.5), language=tr.FiCoCoLConfig(start_layer=0, r=10))
    with tr.apply(vlm.model, active) as handle:
        batch_logits, batch_tokens = vlm.run()
        counts = handle.stats()["language"]["visual_tokens_in"]
        for i in range(len(vlm.prompts)):
            logits, tokens = vlm.run(samples=[i])
            assert torch.equal(tokens[0], batch_tokens[i])
            torch.testing.assert_close(logits[0, -1], batch_logits[i, -1], rtol=1e-4, atol=1e-5)
    assert len(set(counts)) == 3 and all(n < stock for n, stock in zip(counts, vlm.visual))
    assert_detached(vlm.model)
    assert torch.equal(vlm.run()[0], vlm.reference[0])
