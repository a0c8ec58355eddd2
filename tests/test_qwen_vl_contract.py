"""The visual-token reduction contract on Qwen2-VL and Qwen2.5-VL (tiny models, 144-192 merged tokens per image)."""

from __future__ import annotations

import pytest
import qwen_vl_fixtures as qf
import torch
import vlm_fixtures as vf
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.vision_utils import get_vision_window_index

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.ops.grid import factor_grid

KEEP = 16
CASES = {
    "fastervlm": (tr.FasterVLMConfig(ratio=0.0), tr.FasterVLMConfig(keep=KEEP)),
    "vispruner": (tr.VisPrunerConfig(ratio=0.0), tr.VisPrunerConfig(keep=KEEP)),
    "divprune": (tr.DivPruneConfig(ratio=0.0), tr.DivPruneConfig(keep=KEEP)),
    "random": (tr.RandomConfig(ratio=0.0), tr.RandomConfig(keep=KEEP)),
    "uniform": (tr.UniformConfig(ratio=0.0), tr.UniformConfig(keep=KEEP)),
    "pooling": (tr.PoolingConfig(ratio=0.0), tr.PoolingConfig(keep=KEEP)),
}
FIXTURES = {"qwen2_vl": qf.qwen2_vl, "qwen2_5_vl": qf.qwen2_5_vl}
TALL = (28, 24)  # 14 x 12 = 168 merged tokens
# (text before, text after, image grids): different sizes per sample, two images in the last one
SAMPLES = [([7, 8], [9, 10, 11], [qf.SQUARE]), ([12], [13, 14], [qf.WIDE]), ([15, 16, 17], [18], [TALL, qf.SQUARE])]
GRIDS = [g for *_, grids in SAMPLES for g in grids]
PLACEHOLDERS = [qf.merged_tokens(g) for g in GRIDS]
SUPPRESS = [qf.IMAGE_TOKEN, qf.VIDEO_TOKEN, qf.VISION_START, qf.VISION_END]


@pytest.fixture(scope="module", params=list(FIXTURES))
def model(request):
    return FIXTURES[request.param]()


def prompts(samples=SAMPLES):
    return [qf.prompt(before, after, grids) for before, after, grids in samples]


def run(model, samples=SAMPLES, side="left", seed=0, **generate):
    inputs = {**qf.batch(prompts(samples), side), **qf.images([g for *_, grids in samples for g in grids], seed)}
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS, **generate)
    return logits, tokens[:, inputs["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def reference(model):
    return run(model)


def test_every_applicable_method_has_a_case(model):
    """Methods at the merger output; the in-LLM ones have their own suite (``test_inllm_qwen``)."""
    merger = {m for m in tr.supported(model) if "merger_output" in registry.method_for_class(registry.config_class(m)).sites}
    assert merger == {zero.method for zero, _ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(model, reference, case):
    with tr.apply(model, CASES[case][0]) as handle:
        logits, tokens = run(model)
        stats = handle.stats()
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert stats["visual_tokens_in"] == PLACEHOLDERS and stats["visual_tokens_out"] == PLACEHOLDERS


def reduced_length() -> int:
    """Width of the shortened batch: the longest sample once each image keeps KEEP tokens (padding is rebuilt)."""
    return max(len(p) - sum(qf.merged_tokens(g) - KEEP for g in grids) for p, (*_, grids) in zip(prompts(), SAMPLES))


def test_bare_model_class(model):
    inputs = {**qf.batch(prompts()), **qf.images(GRIDS)}
    with tr.apply(model.model, tr.DivPruneConfig(keep=KEEP)) as handle, torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state
        assert handle.stats()["visual_tokens_out"] == [KEEP] * len(GRIDS)
    assert hidden.shape[1] == reduced_length()


class CountSdpa(TorchFunctionMode):
    """Counts calls of the fused attention kernel."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_active_keeps_budget_per_image_and_remove_restores(model, case):
    inputs = {**qf.batch(prompts()), **qf.images(GRIDS)}
    with torch.no_grad(), CountSdpa() as stock:
        expected = model(**inputs).logits
    handle = tr.apply(model, CASES[case][1])
    with torch.no_grad(), CountSdpa() as reduced:
        logits = model(**inputs).logits
    stats = handle.stats()
    handle.remove()
    assert stats["visual_tokens_out"] == [KEEP] * len(GRIDS)
    assert logits.shape[1] == reduced_length() and torch.isfinite(logits).all()
    assert reduced.calls == stock.calls > 0  # every vision block and decoder layer still runs the fused SDPA kernel
    assert model.config.vision_config._attn_implementation == "sdpa" and model.config.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def kept_slots(full: torch.Tensor, reduced: torch.Tensor, grid: tuple[int, int], case: str) -> torch.Tensor:
    """Placeholder slot of each reduced token: its row in the full features; a pooling cell's top-left token."""
    if case == "pooling":
        rows, cols = grid[0] // qf.MERGE, grid[1] // qf.MERGE
        cell_rows, cell_cols = factor_grid(reduced.shape[0], rows, cols)
        starts = [torch.arange(m) * n // m for n, m in ((rows, cell_rows), (cols, cell_cols))]
        return (starts[0][:, None] * cols + starts[1][None, :]).flatten()
    match = (reduced[:, None] == full[None]).all(-1)
    assert match.any(1).all()
    return match.float().argmax(1)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_stock_model_fed_pruned_embeddings_and_gathered_positions(model, case):
    batch, pixels = qf.batch(prompts()), qf.images(GRIDS)
    with torch.no_grad():
        full = model.model.get_image_features(**pixels).pooler_output
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], pixels["image_grid_thw"],
                                                  attention_mask=batch["attention_mask"])
    with tr.apply(model, CASES[case][1]):
        _, tokens = run(model)
        with torch.no_grad():
            reduced = model.model.get_image_features(**pixels).pooler_output
    ids, mask = batch["input_ids"], batch["attention_mask"]
    slots = iter([kept_slots(f, r, g, case) for f, r, g in zip(full, reduced, GRIDS)])
    reduced = iter(reduced)
    short = []  # per sample: (kept columns, their embeddings)
    with torch.no_grad():
        for b, (*_, grids) in enumerate(SAMPLES):
            keep = mask[b].bool() & (ids[b] != qf.IMAGE_TOKEN)
            runs = (ids[b] == qf.IMAGE_TOKEN).nonzero()[:, 0].split([qf.merged_tokens(g) for g in grids])
            for image_columns in runs:
                keep[image_columns[next(slots)]] = True
            columns = keep.nonzero()[:, 0]
            embeds = model.get_input_embeddings()(ids[b, columns])
            embeds[ids[b, columns] == qf.IMAGE_TOKEN] = torch.cat([next(reduced) for _ in grids])
            short.append((columns, embeds))
        width = max(c.numel() for c, _ in short)
        embeds = torch.zeros(len(short), width, model.config.text_config.hidden_size)
        short_positions = torch.zeros(3, len(short), width, dtype=torch.long)
        short_mask = torch.zeros(len(short), width, dtype=torch.long)
        for b, (columns, sample) in enumerate(short):  # left padding
            embeds[b, width - columns.numel():] = sample
            short_positions[:, b, width - columns.numel():] = positions[:, b, columns]
            short_mask[b, width - columns.numel():] = 1
        expected = model.generate(inputs_embeds=embeds, attention_mask=short_mask, position_ids=short_positions,
                                  max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("case", ["fastervlm", "pooling"])
def test_cached_generate_equals_recomputation(model, case):
    with tr.apply(model, CASES[case][1]):
        _, cached = run(model)
        _, recomputed = run(model, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_decoding_through_model_calls_continues_from_the_stock_rope_deltas(model):
    inputs = {**qf.batch(prompts()), **qf.images(GRIDS)}
    with tr.apply(model, tr.FasterVLMConfig(keep=KEEP)):
        _, generated = run(model)
        with torch.no_grad():
            out = model(**inputs)
            mask, tokens = inputs["attention_mask"], []
            for _ in range(4):
                token = out.logits[:, -1].clone()
                token[:, SUPPRESS] = -torch.inf
                tokens.append(token.argmax(-1, keepdim=True))
                mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
                out = model(input_ids=tokens[-1], attention_mask=mask, past_key_values=out.past_key_values)
    assert torch.equal(torch.cat(tokens, dim=1), generated)


@pytest.mark.parametrize(("case", "side"), [*((case, "left") for case in CASES), ("fastervlm", "right")])
def test_padded_batch_with_different_image_sizes_equals_samples_one_by_one(model, case, side):
    with tr.apply(model, CASES[case][1]):
        batch_logits, batch_tokens = run(model, side=side, seed=3)
        pixels = qf.images(GRIDS, seed=3)["pixel_values"].split([h * w for h, w in GRIDS])
        first = 0
        for i, sample in enumerate(SAMPLES):
            images = len(sample[2])
            inputs = {**qf.batch(prompts([sample])), "pixel_values": torch.cat(pixels[first : first + images]),
                      "image_grid_thw": torch.tensor([[1, h, w] for h, w in sample[2]])}
            first += images
            with torch.no_grad():
                logits = model(**inputs).logits
                tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)[:, inputs["input_ids"].shape[1]:]
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            last = -1 if side == "left" else logits.shape[1] - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


class RecordReceived:
    """An attention function that runs SDPA and records, per call of one module, the attention each key receives."""

    name = "tokenreduce_test_record"

    def __init__(self, module):
        self.module, self.received = module, []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if module is self.module:
            probs = ((query @ key.transpose(-1, -2)) * kwargs["scaling"]).softmax(-1)
            self.received.append(probs.sum(dim=2).mean(dim=1)[0])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_scores_are_attention_received_at_the_last_full_attention_block_averaged_per_merge_group(model):
    visual = model.model.visual
    probe = len(visual.blocks) - 1 if not hasattr(visual, "fullatt_block_indexes") else max(visual.fullatt_block_indexes)
    record = RecordReceived(visual.blocks[probe].attn)
    AttentionInterface.register(record.name, record)
    pixels = qf.images(GRIDS)
    visual.config._attn_implementation = record.name
    try:
        with torch.no_grad():
            model.model.get_image_features(**pixels)
    finally:
        visual.config._attn_implementation = "sdpa"
    groups = torch.cat(record.received).view(-1, 4).mean(-1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL keeps patches in window order inside the tower
        window_index, _ = get_vision_window_index(pixels["image_grid_thw"], 2, visual.window_size, visual.patch_size)
        groups = groups[window_index.argsort()]
    expected = [s.topk(KEEP).indices.sort().values for s in groups.split(PLACEHOLDERS)]
    with torch.no_grad():
        full = model.model.get_image_features(**pixels).pooler_output
        with tr.apply(model, tr.FasterVLMConfig(keep=KEEP)):
            reduced = model.model.get_image_features(**pixels).pooler_output
    assert all(torch.equal(kept_slots(f, r, g, "fastervlm"), e) for f, r, g, e in zip(full, reduced, GRIDS, expected))


def test_window_order_is_undone_by_the_models_own_reversal():
    model = qf.qwen2_5_vl()
    visual, pixels = model.model.visual, qf.images(GRIDS)
    merged = []
    handle = visual.merger.register_forward_hook(lambda _m, _a, out: merged.append(out))
    with torch.no_grad():
        pooled = torch.cat(model.model.get_image_features(**pixels).pooler_output)
    handle.remove()
    window_index, _ = get_vision_window_index(pixels["image_grid_thw"], 2, visual.window_size, visual.patch_size)
    assert torch.equal(merged[0][window_index.argsort()], pooled)


def test_prompt_without_image_is_a_no_op_with_a_stats_note(model):
    vf.assert_text_only_prompt_is_a_no_op(model, tr.FasterVLMConfig(keep=KEEP), qf.batch([[qf.BOS, 7, 8, 9]]))


def test_mismatched_images_and_placeholders(model):
    inputs = {**qf.batch([qf.prompt([7], [8], [qf.SQUARE])]), **qf.images([qf.SQUARE, qf.SQUARE])}
    with tr.apply(model, tr.FasterVLMConfig(keep=KEEP)):
        with pytest.raises(ValueError, match=r"2 image\(s\) of \[144, 144\] merged tokens need as many image placeholder tokens, image by image, got \[144\]"):
            model(**inputs)


def test_keep_larger_than_an_images_tokens(model):
    inputs = {**qf.batch([qf.prompt([7], [8], [qf.SQUARE])]), **qf.images([qf.SQUARE])}
    with tr.apply(model, tr.FasterVLMConfig(keep=200)):
        with pytest.raises(tr.ConfigError, match=r"keep=200 is larger than the 144 reducible tokens"):
            model(**inputs)
    assert tr.remove(model) == 0


def test_methods_needing_cls_tokens_and_keys_are_refused(model):
    with pytest.raises(tr.UnsupportedModelError, match=r"visionzip acts on \['vit_output'\] sites .* offers \['llm', 'merger_output'\]"):
        tr.apply(model, tr.VisionZipConfig(keep=32))
    assert tr.remove(model) == 0


def test_missing_mm_token_type_ids_is_a_clear_error(model):
    inputs = {**qf.batch([qf.prompt([7], [8], [qf.SQUARE])]), **qf.images([qf.SQUARE])}
    del inputs["mm_token_type_ids"]
    with tr.apply(model, tr.FasterVLMConfig(keep=KEEP)):
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**inputs)


def test_bf16(model):
    inputs = {**qf.batch(prompts()), **qf.images(GRIDS)}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    try:
        with tr.apply(model, tr.VisPrunerConfig(keep=KEEP)) as handle, torch.no_grad():
            logits = model(**inputs).logits
            assert handle.stats()["visual_tokens_out"] == [KEEP] * len(GRIDS)
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    finally:
        model.to(torch.float32)
