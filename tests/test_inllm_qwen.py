"""The in-LLM contract (hooks H4/H5) on Qwen2-VL and Qwen2.5-VL: 4-layer text models, M-RoPE positions, 144 tokens per image.

The cases, oracles and probes are the LLaVA contract's (``test_inllm_contract``); what
differs is the model: positions are the model's own 3-row M-RoPE ids (the oracles run
the unreduced model and never re-derive them), and the visual count is known only at
each prefill (dynamic resolution).
"""

from __future__ import annotations

import copy

import pytest
import qwen_vl_fixtures as qf
import torch
import vlm_fixtures as vf
from test_inllm_contract import (
    CASES, LAYERS, MERGING, assert_detached, counted_calls, eager_last_row, masked_oracle, record_selection, replay_selection,
)

import tokenreduce as tr
from tokenreduce import registry

FIXTURES = {"qwen2_vl": qf.qwen2_vl, "qwen2_5_vl": qf.qwen2_5_vl}
TEXTS = [([7, 8], [9, 10, 11]), ([12], [13, 14]), ([15, 16, 17, 18], [19])]
IMAGE_TOKENS = qf.merged_tokens(qf.SQUARE)  # 144, as in the LLaVA cases
SUPPRESS = [qf.IMAGE_TOKEN, qf.VIDEO_TOKEN, qf.VISION_START, qf.VISION_END]


@pytest.fixture(scope="module", params=list(FIXTURES))
def model(request):
    return FIXTURES[request.param](LAYERS)


def inputs(grids: list[tuple[int, int]] | None = None, side: str = "left", seed: int = 0, texts=TEXTS) -> dict[str, torch.Tensor]:
    """A padded batch of ``texts``, one image per sample (all ``qf.SQUARE`` unless ``grids`` says otherwise)."""
    grids = grids or [qf.SQUARE] * len(texts)
    prompts = [qf.prompt(before, after, [grid]) for (before, after), grid in zip(texts, grids)]
    return {**qf.batch(prompts, side), **qf.images(grids, seed)}


def sample(batch: dict[str, torch.Tensor], grids: list[tuple[int, int]], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of a batch built by :func:`inputs`, unpadded, with its own image."""
    real = batch["attention_mask"][i].bool()
    first = sum(h * w for h, w in grids[:i])
    h, w = grids[i]
    return {**{key: batch[key][i : i + 1, real] for key in ("input_ids", "attention_mask", "mm_token_type_ids")},
            "pixel_values": batch["pixel_values"][first : first + h * w], "image_grid_thw": batch["image_grid_thw"][i : i + 1]}


def run(model, batch: dict[str, torch.Tensor], **generate) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one forward and 4 greedy tokens (the model computes its M-RoPE ids, skipping padding)."""
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, **generate)
    return logits, tokens[:, batch["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def reference(model):
    return run(model, inputs())


def untouched(model, reference) -> None:
    assert_detached(model)
    assert torch.equal(run(model, inputs())[0], reference[0])


def in_llm(model) -> set[str]:
    return {m for m in tr.supported(model) if registry.method_for_class(registry.config_class(m)).sites == {"llm"}}


def test_every_in_llm_method_is_supported_and_has_a_case(model):
    assert in_llm(model) == {zero.method for zero, _, _ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(model, reference, case):
    with tr.apply(model, CASES[case][0]) as handle:
        logits, tokens = run(model, inputs())
        stats = handle.stats()
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert stats["visual_tokens_per_layer"] == [IMAGE_TOKENS] * LAYERS and stats["kept"] == {}


@pytest.mark.parametrize("case", list(CASES))
def test_active_reports_stats_and_remove_restores(model, reference, case):
    batch = inputs()
    with tr.apply(model, CASES[case][1]) as handle:
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        stats = handle.stats()
        _, tokens = run(model, batch)
    per_layer = CASES[case][2]
    assert stats["visual_tokens_per_layer"] == per_layer
    assert stats["sequence_per_layer"] == [batch["input_ids"].shape[1] - IMAGE_TOKENS + v for v in per_layer]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == stats["sequence_per_layer"]
    assert out.logits.shape[1] == stats["sequence_per_layer"][-1] and torch.isfinite(out.logits).all()
    assert not torch.equal(tokens, reference[1]) or not torch.equal(out.logits[:, -1], reference[0][:, -1])
    untouched(model, reference)


@pytest.mark.parametrize("case", sorted(set(CASES) - MERGING))
def test_dropping_equals_masking_at_original_m_rope_positions(model, case):
    batch = inputs(seed=3)
    with tr.apply(model, CASES[case][1]) as handle:
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        kept = handle.stats()["kept"]
    expected = masked_oracle(model, model.model.language_model, batch["input_ids"] == qf.IMAGE_TOKEN, kept, **batch)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_generate_equals_recomputation_with_the_same_kept_set(model, case):
    with tr.apply(model, CASES[case][1]) as handle:
        recorded = record_selection(handle)
        _, cached = run(model, inputs())
        replay_selection(handle, recorded)
        _, recomputed = run(model, inputs(), use_cache=False)
    assert torch.equal(cached, recomputed)


def assert_batch_equals_samples(model, config, grids: list[tuple[int, int]], side: str) -> None:
    """Each sample of a padded batch gets the logits, tokens and kept columns it gets alone."""
    batch = inputs(grids, side, seed=4)
    width = batch["input_ids"].shape[1]
    with tr.apply(model, config) as handle:
        batch_logits, batch_tokens = run(model, batch)
        batch_kept = handle.stats()["kept"]
        for i in range(len(grids)):
            alone = sample(batch, grids, i)
            logits, tokens = run(model, alone)
            length = alone["input_ids"].shape[1]
            offset = width - length if side == "left" else 0
            assert {layer: [[c - offset for c in rows[i]]] for layer, rows in batch_kept.items()} == handle.stats()["kept"]
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            last = -1 if side == "left" else logits.shape[1] - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_of_same_size_images_equals_samples_one_by_one(model, case, side):
    assert_batch_equals_samples(model, CASES[case][1], [qf.SQUARE] * len(TEXTS), side)


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_of_different_image_sizes_equals_samples_one_by_one(model, case):
    assert_batch_equals_samples(model, CASES[case][1], [qf.SQUARE, qf.WIDE, qf.SQUARE], "left")


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_runs_once_and_attention_stays_sdpa(model, case, monkeypatch):
    batch = inputs()
    with counted_calls(model.model.language_model, monkeypatch) as (layer_calls, calls), tr.apply(model, CASES[case][1]):
        with torch.no_grad():
            model(**batch)
            assert layer_calls == [1] * LAYERS and calls == list(range(LAYERS))
            model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert layer_calls == [5] * LAYERS  # one prefill + 3 decode steps, each layer once per forward
    assert calls == list(range(LAYERS)) * 5


@pytest.mark.parametrize("case", list(CASES))
def test_bf16(model, case):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = inputs()
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    reference = run(bf16, batch)
    with tr.apply(bf16, CASES[case][0]):
        zero = run(bf16, batch)
    with tr.apply(bf16, CASES[case][1]) as handle:
        logits, _ = run(bf16, batch)
        assert handle.stats()["visual_tokens_per_layer"] == CASES[case][2]
    assert torch.equal(zero[0], reference[0]) and torch.equal(zero[1], reference[1])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def top_of_eager_row(model, batch: dict[str, torch.Tensor], layer: int, keep: int) -> list[list[int]]:
    """The ``keep`` image columns the unreduced eager model's last token attends most at ``layer`` (head mean)."""
    row = eager_last_row(model, layer, **batch)
    return row.masked_fill(batch["input_ids"] != qf.IMAGE_TOKEN, -1).topk(keep, dim=-1).indices.sort(dim=-1).values.tolist()


@pytest.mark.parametrize("config, layer, expected_layer", [
    (tr.FastVConfig(layer=2, keep=40), 2, 1),  # FastV: the observed row of layer K-1
    (tr.PDropConfig(layers=(2,), ratios=(0.25,)), 2, 2),  # PDrop: probe P2, layer K's own weights and M-RoPE
])
def test_cut_keeps_the_top_of_the_eager_attention_row(model, config, layer, expected_layer):
    batch = inputs(seed=2)  # left padding: the last column is every sample's last token
    with tr.apply(model, config) as handle:
        with torch.no_grad():
            model(**batch)
        kept = handle.stats()["kept"]
    assert kept == {layer: top_of_eager_row(model, batch, expected_layer, len(kept[layer][0]))}


def test_prompt_without_image_is_a_no_op_with_a_stats_note(model):
    vf.assert_text_only_prompt_is_a_no_op(model, tr.FastVConfig(keep=16), qf.batch([[qf.BOS, 7, 8, 9]]))


def test_keep_larger_than_the_images_tokens_raises_at_the_prefill_and_the_model_keeps_working(model, reference):
    with tr.apply(model, tr.FastVConfig(keep=150)) as handle:
        with pytest.raises(tr.ConfigError, match=r"keep=150 is larger than the 144 reducible tokens"):
            run(model, inputs())
        run(model, inputs([qf.WIDE] * len(TEXTS)))
        assert handle.stats()["kept"][2] and handle.stats()["visual_tokens_per_layer"] == [192, 192, 150, 150]
    untouched(model, reference)


def test_cut_layer_beyond_the_decoder_is_refused_at_apply(model, reference):
    with pytest.raises(tr.ConfigError, match=r"layer=4 is out of range; this model's decoder has layers 0..3"):
        tr.apply(model, tr.FastVConfig(layer=LAYERS))
    untouched(model, reference)


def test_sliding_window_layers_are_refused_untouched(model):
    windowed = copy.deepcopy(model)
    windowed.config.text_config.layer_types[-1] = "sliding_attention"
    with pytest.raises(tr.UnsupportedModelError, match=r"'sliding_attention' layers \(layer_types\)"):
        tr.apply(windowed, tr.FastVConfig())
    assert_detached(windowed)


def test_video_placeholders_are_visual_tokens_too(model):
    frames, grid = 2, (12, 12)
    tokens = frames * qf.merged_tokens(grid)  # 72
    batch = {**qf.batch([[qf.BOS, 7, qf.VISION_START, *[qf.VIDEO_TOKEN] * tokens, qf.VISION_END, 8, 9]]), **qf.video(frames, grid)}
    with tr.apply(model, tr.FastVConfig(keep=20)) as handle:
        _, generated = run(model, batch)
        stats = handle.stats()
    video_columns = set((batch["input_ids"][0] == qf.VIDEO_TOKEN).nonzero()[:, 0].tolist())
    assert stats["visual_tokens_per_layer"] == [tokens, tokens, 20, 20]
    assert len(stats["kept"][2][0]) == 20 and set(stats["kept"][2][0]) <= video_columns
    assert generated.shape == (1, 4)


def test_bare_model_class(model):
    batch = inputs()
    with tr.apply(model.model, tr.FastVConfig(layer=2, keep=40)) as handle, torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        assert handle.stats()["visual_tokens_per_layer"] == CASES["fastv"][2]
    assert hidden.shape[1] == batch["input_ids"].shape[1] - IMAGE_TOKENS + 40
