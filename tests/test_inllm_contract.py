"""The contract of in-LLM reduction (hooks H4/H5) on VLM fixtures whose language model is a 4-layer Llama decoder.

Each case: (zero-strength config, active config, visual tokens per decoder layer when
active on one 144-token LLaVA image). The checks every fixture shares run on
:class:`Batch` fixtures: ``llava`` (one 144-token image per sample), ``next``
(LLaVA-NeXT images of different crop grids, one sample with two: every sample has
its own visual count) and, for batch and cache checks, ``llava_ragged`` (two
images, one image and none in one batch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import types
from collections.abc import Callable, Iterator

import llava_next_fixtures as nf
import pytest
import torch
import vlm_fixtures as vf
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_utils import AttentionInterface

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.adapters import decoder
from tokenreduce.methods.dart import DART
from tokenreduce.methods.inllm import DecoderMethod
from tokenreduce.methods.pdrop import PDrop
from tokenreduce.ops.matching import least_duplicated
from tokenreduce.ops.merge import TokenPlan
from tokenreduce.ops.scoring import query_rows_attention

LAYERS = 4
CASES = {
    "fastv": (tr.FastVConfig(ratio=0.0), tr.FastVConfig(layer=2, keep=40), [144, 144, 40, 40]),
    "pdrop": (tr.PDropConfig(layers=(1, 2, 3), lam=1.0), tr.PDropConfig(layers=(1, 2, 3), lam=0.5), [144, 72, 36, 18]),
    "dart": (tr.DARTConfig(ratio=0.0), tr.DARTConfig(layer=2, keep=30), [144, 144, 30, 30]),
    # 2 / 6 / 15 of 32 layers scale to 0 / 1 / 2 of 4: cuts at 1 / 2 / 3
    # v1.5 recycles: 44 pruned -> int(13.2) + 1 = 14 candidates -> 2 clusters (102); 52 -> 16 -> 2 (52); 32 -> 10 -> 2 (22)
    # zero strength: a T_eq budget no prompt reaches keeps every visual token whatever each sample's count
    "sparsevlm": (tr.SparseVLMConfig(equivalent_tokens=10**6), tr.SparseVLMConfig(schedule=(100, 50, 20)), [144, 102, 52, 22]),
    "sparsevlm_pruning": (tr.SparseVLMConfig(equivalent_tokens=10**6, recycle=False), tr.SparseVLMConfig(schedule=(100, 50, 20), recycle=False),
                          [144, 100, 50, 20]),
    "sparsevlm_v2": (tr.SparseVLMConfig(mode="v2", equivalent_tokens=10**6), tr.SparseVLMConfig(mode="v2", schedule=(100, 50, 20)),
                     [144, 100, 50, 20]),
    "ficoco_l": (tr.FiCoCoLConfig(start_layer=0, r=0), tr.FiCoCoLConfig(start_layer=0), [144, 144, 130, 116]),
}
MERGING = {"ficoco_l", "sparsevlm"}  # folds discarded tokens into kept ones: not equal to masking them
TEXTS = [([7, 8], [9, 10, 11]), ([12], [13, 14]), ([15, 16, 17, 18], [19])]
NEXT_SAMPLES = [(["wide2"], [7, 8], [9, 10, 11]), (["wide3", "square4"], [12], [13, 14]), (["square4"], [15, 16, 17, 18], [19])]


def deep_llava() -> LlavaForConditionalGeneration:
    """The LLaVA fixture with a 4-layer language model, so that cuts have layers before and after them."""
    config = copy.deepcopy(vf.llava().config)
    config.text_config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@dataclasses.dataclass
class Batch:
    """A fixture model with a batch of prompts, their images and what an unreduced run gives.

    encode(seed) gives the model's image inputs for all images of the batch (image first),
    sample by sample; images_per_sample says which belong to which sample.
    """

    model: nn.Module
    prompts: list[list[int]]
    visual: list[int]  # visual tokens per sample
    images_per_sample: list[int]
    encode: Callable[[int], dict[str, torch.Tensor]]
    dtype: torch.dtype = torch.float32

    def images(self, seed: int = 0, samples: list[int] | None = None) -> dict[str, torch.Tensor]:
        """The image inputs of ``samples`` (all by default); empty when they hold no image."""
        starts = [0, *itertools.accumulate(self.images_per_sample)]
        picked = [i for s in (range(len(self.prompts)) if samples is None else samples) for i in range(starts[s], starts[s + 1])]
        if not picked:
            return {}
        return {k: (v.to(self.dtype) if v.is_floating_point() else v)[picked] for k, v in self.encode(seed).items()}

    def run(self, side: str = "left", seed: int = 0, samples: list[int] | None = None, **generate) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions skip left padding in the forward too (DART's key norms after RoPE depend on absolute positions)."""
        prompts = self.prompts if samples is None else [self.prompts[i] for i in samples]
        return vf.logits_and_tokens(self.model, prompts, self.images(seed, samples), side, count_positions=True, **generate)

    @functools.cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run()


def llava_batch(model: nn.Module, images_per_sample: list[int]) -> Batch:
    prompts = [vf.prompt(before, after, images) for (before, after), images in zip(TEXTS, images_per_sample)]
    return Batch(model, prompts, [vf.IMAGE_TOKENS * n for n in images_per_sample], images_per_sample,
                 lambda seed: {"pixel_values": vf.pixels(sum(images_per_sample), seed)})


def next_batch(model: nn.Module) -> Batch:
    lengths = dict(zip(nf.SIZES, nf.stock_lengths(model, list(nf.SIZES))))
    names = [name for images, _, _ in NEXT_SAMPLES for name in images]
    prompts = [nf.prompt(before, after, [lengths[n] for n in images]) for images, before, after in NEXT_SAMPLES]

    def encode(seed: int) -> dict[str, torch.Tensor]:
        pixels, sizes = nf.images(names, seed)
        return {"pixel_values": pixels, "image_sizes": sizes}

    return Batch(model, prompts, [sum(lengths[n] for n in images) for images, _, _ in NEXT_SAMPLES],
                 [len(images) for images, _, _ in NEXT_SAMPLES], encode)


@pytest.fixture(scope="module")
def model():
    return deep_llava()


@pytest.fixture(scope="module")
def next_model():
    return nf.llava_next(layers=LAYERS)


@pytest.fixture(scope="module")
def llava(model):
    return llava_batch(model, [1, 1, 1])


@pytest.fixture(scope="module")
def prompts(llava):
    return llava.prompts


@pytest.fixture(scope="module", params=["llava", "next"])
def vlm(request, llava, model, next_model):
    """The shared checks' fixtures; tests on batches and caches add ``llava_ragged`` (indirect parametrization)."""
    if request.param == "llava":
        return llava
    return next_batch(next_model) if request.param == "next" else llava_batch(model, [2, 1, 0])


ALL_BATCHES = pytest.mark.parametrize("vlm", ["llava", "next", "llava_ragged"], indirect=True)


def schedule(method: DecoderMethod, visual: int) -> list[int]:
    """Visual tokens a sample with ``visual`` of them holds at every decoder layer."""
    at, kept = dict(method.cuts(visual)), visual
    return [kept := min(kept, at.get(layer, kept)) for layer in range(LAYERS)]


def test_every_in_llm_method_has_a_case():
    in_llm = {m for m in tr.supported(vf.llava()) if registry.method_for_class(registry.config_class(m)).sites == {"llm"}}
    assert {zero.method for zero, _, _ in CASES.values()} == in_llm
    assert in_llm <= set(tr.supported(nf.llava_next()))


@pytest.mark.parametrize("case", list(CASES))
def test_cases_schedules_on_one_llava_image(model, case):
    with tr.apply(model, CASES[case][1]) as handle:
        assert schedule(handle.method, vf.IMAGE_TOKENS) == CASES[case][2]


def in_dtype(vlm: Batch, dtype: torch.dtype) -> Batch:
    return vlm if dtype == torch.float32 else dataclasses.replace(vlm, model=copy.deepcopy(vlm.model).to(dtype), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(vlm, case, dtype):
    vlm = in_dtype(vlm, dtype)
    with tr.apply(vlm.model, CASES[case][0]) as handle:
        logits, tokens = vlm.run()
        stats = handle.stats()
    assert torch.equal(logits, vlm.reference[0]) and torch.equal(tokens, vlm.reference[1])
    assert stats["visual_tokens_per_sample"] == [[n] * LAYERS for n in vlm.visual] and stats["kept"] == {}


@pytest.mark.parametrize("case", list(CASES))
def test_active_reports_stats_and_remove_restores(vlm, case):
    ids, mask = vf.batch(vlm.prompts)
    batch = len(vlm.prompts)
    with tr.apply(vlm.model, CASES[case][1]) as handle:
        with torch.no_grad():
            out = vlm.model(input_ids=ids, attention_mask=mask, **vlm.images(), use_cache=True)
        stats = handle.stats()
        _, tokens = vlm.run()
        after_generate = handle.stats()["kv_cache_bytes"]
        per_sample = [schedule(handle.method, n) for n in vlm.visual]
    assert stats["visual_tokens_per_sample"] == per_sample
    assert stats["equivalent_tokens"] == pytest.approx(sum(map(sum, per_sample)) / batch / LAYERS, rel=1e-12)
    # after a cut the batch is as long as its longest sample's live tokens
    assert stats["sequence_per_layer"] == [max(len(p) - n + v[layer] for p, n, v in zip(vlm.prompts, vlm.visual, per_sample))
                                           for layer in range(LAYERS)]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == stats["sequence_per_layer"]
    assert stats["kv_cache_bytes"] == sum(2 * batch * 2 * n * 8 * 4 for n in lengths)  # K and V, 2 KV heads, d=8, fp32
    assert after_generate == sum(2 * batch * 2 * (n + 3) * 8 * 4 for n in lengths)  # + 3 decode steps in every layer
    assert out.logits.shape[1] == stats["sequence_per_layer"][-1] and torch.isfinite(out.logits).all()
    assert not torch.equal(tokens, vlm.reference[1]) or not torch.equal(out.logits[:, -1], vlm.reference[0][:, -1])
    untouched(vlm)
    assert torch.equal(vlm.run()[1], vlm.reference[1])


def masked_oracle(model, language, visual: torch.Tensor, kept: dict[int, list[list[int]]], **inputs) -> torch.Tensor:
    """Last-token logits of FastV's "mask" variant (METHODS.md C1, step 5): the unreduced model with its own positions.

    The sequence keeps its full length and the model computes its own positions (Llama's
    column index, Qwen's M-RoPE ids); every layer of ``language`` gets a causal mask
    with padding that, from each cut layer on, also hides the dropped ``visual`` [B, L]
    columns. For the kept tokens this is what real dropping must compute.
    """
    mask = inputs["attention_mask"]
    length = mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    masks = []
    for index in range(len(language.layers)):
        if index in kept:
            dropped = visual.clone()
            for b, row in enumerate(kept[index]):
                dropped[b, row] = False
            allowed = allowed & ~dropped[:, None, :]
        masks.append((allowed | torch.eye(length, dtype=torch.bool))[:, None])  # padding rows see themselves

    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs, i=i: (args, {**kwargs, "attention_mask": masks[i]}),
                                             with_kwargs=True)
             for i, layer in enumerate(language.layers)]
    try:
        with torch.no_grad():
            return model(**inputs).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("case", sorted(set(CASES) - MERGING))
def test_dropping_equals_masking_at_original_positions(model, prompts, case):
    ids, mask = vf.batch(prompts)
    pixels = vf.pixels(3, seed=3)
    with tr.apply(model, CASES[case][1]) as handle:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        kept = handle.stats()["kept"]
    expected = masked_oracle(model, model.model.language_model, ids == vf.IMAGE_TOKEN, kept, input_ids=ids, attention_mask=mask,
                             pixel_values=pixels)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def next_vlm(next_model):
    return next_batch(next_model)


def test_next_llm_site_leaves_the_vision_path_stock(next_vlm):
    inner = next_vlm.model.model
    with tr.apply(next_vlm.model, tr.FastVConfig(keep=40)) as handle:
        assert handle.adapter.site == "llm" and not {"pack_image_features", "get_image_features"} & set(vars(inner))
    untouched(next_vlm)


def test_next_keep_beyond_an_image_raises_at_its_prefill_and_leaves_the_model_working(next_vlm):
    smallest = min(next_vlm.visual)
    with tr.apply(next_vlm.model, tr.FastVConfig(keep=smallest + 1)) as handle:
        with pytest.raises(tr.ConfigError, match=rf"keep={smallest + 1} is larger than the {smallest} reducible tokens of this input"):
            next_vlm.run()
        big = next_vlm.visual.index(max(next_vlm.visual))
        next_vlm.run(samples=[big])
        assert handle.stats()["visual_tokens_per_sample"] == [schedule(handle.method, max(next_vlm.visual))]
    untouched(next_vlm)


Recorded = dict[int, list[tuple[int, torch.Tensor | TokenPlan]]]


def record_selection(handle) -> Recorded:
    """Record what the method's cuts return in the next prefill: by layer, (sequence length, kept indices or plan) per call.

    A layer's cut is one call, or one per sample that cuts in a batch whose samples have different visual counts.
    """
    recorded, select, prefill = {}, handle.method.select, handle.stats()["prefills"] + 1

    def recording(site):
        choice = select(site)
        if handle.stats()["prefills"] == prefill:
            recorded.setdefault(site.layer, []).append((site.hidden.shape[1], choice))
        return choice

    handle.method.select = recording
    return recorded


def replay_selection(handle, recorded: Recorded) -> None:
    """Make every later cut repeat the recorded one, whatever the scores (each prefill makes the same calls in the same order).

    A no-cache ``generate`` re-runs the prompt (same padding, same indices) with the new
    tokens appended after it: kept visual indices stay valid, and a plan also keeps
    the appended tokens, which come after every output it merges into.
    """
    calls: dict[tuple[int, int], itertools.count] = {}

    def select(site):
        call = next(calls.setdefault((handle.stats()["prefills"], site.layer), itertools.count()))
        length, choice = recorded[site.layer][call]
        if not isinstance(choice, TokenPlan):
            return choice
        appended = torch.arange(length, site.hidden.shape[1]).expand(choice.keep.shape[0], -1)
        return dataclasses.replace(choice, keep=torch.cat([choice.keep, appended], dim=1))

    handle.method.select = select


def check_cached_generate_equals_recomputation(vlm: Batch, config, stage: str | None = None) -> None:
    """``generate()`` on the cut cache gives the tokens and step logits of a no-cache generation making the same cuts.

    Convention 0.5.6. The logits too: a random model's greedy tokens barely depend on
    positions, and decode steps must number their token as the recomputed prompt does.
    ``stage``: the in-LLM stage of a staged config, whose cuts are recorded and replayed.
    """
    ids, mask = vf.batch(vlm.prompts)
    with tr.apply(vlm.model, config) as handle:
        cutting = handle if stage is None else types.SimpleNamespace(method=handle.method.stage(stage), stats=lambda: handle.stats()[stage])
        recorded = record_selection(cutting)
        cached = vf.generate_with_logits(vlm.model, ids, mask, **vlm.images())
        replay_selection(cutting, recorded)
        recomputed = vf.generate_with_logits(vlm.model, ids, mask, **vlm.images(), use_cache=False)
    assert torch.equal(cached[0], recomputed[0])
    torch.testing.assert_close(cached[1], recomputed[1], rtol=1e-4, atol=1e-5)


@ALL_BATCHES
@pytest.mark.parametrize("case", list(CASES))
def test_cached_generate_equals_recomputation_with_the_same_kept_set(vlm, case):
    check_cached_generate_equals_recomputation(vlm, CASES[case][1])


def check_padded_batch_equals_samples_one_by_one(vlm: Batch, config, side: str) -> None:
    """Each sample of a ``side``-padded batch cuts, scores and generates as in its own unpadded run (convention 0.5.7)."""
    width = max(map(len, vlm.prompts))
    with tr.apply(vlm.model, config) as handle:
        batch_logits, batch_tokens = vlm.run(side=side, seed=4)
        batch_kept = handle.stats()["kept"]
        for i, prompt in enumerate(vlm.prompts):
            logits, tokens = vlm.run(seed=4, samples=[i])
            offset = width - len(prompt) if side == "left" else 0
            expected = {layer: [[c - offset for c in rows[i]]] for layer, rows in batch_kept.items()} if vlm.visual[i] else {}
            assert expected == handle.stats()["kept"]
            if side == "left":  # generation with right padding is wrong for any decoder-only model
                assert torch.equal(tokens[0], batch_tokens[i])
            # right padding: a sample's own run keeps its live tokens; in the batch its padding, then its removed
            # tokens before its last one, fill it up to the batch's length
            last = -1 if side == "left" else max(logits.shape[1], batch_logits.shape[1] - width + len(prompt)) - 1
            torch.testing.assert_close(logits[0, -1], batch_logits[i, last], rtol=1e-4, atol=1e-5)


@ALL_BATCHES
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_equals_samples_one_by_one(vlm, case, side):
    check_padded_batch_equals_samples_one_by_one(vlm, CASES[case][1], side)


@contextlib.contextmanager
def counted_calls(language, monkeypatch) -> Iterator[tuple[list[int], list[int]]]:
    """Count, while in the block, the calls of each decoder layer of ``language`` and of SDPA by its attention modules.

    Yields (calls per layer, layer index of each SDPA call in order).
    """
    sdpa = AttentionInterface._global_mapping["sdpa"]
    calls: list[int] = []
    attentions = {layer.self_attn for layer in language.layers}

    def counting_sdpa(module, *args, **kwargs):
        if module in attentions:
            calls.append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    layer_calls = [0] * len(language.layers)
    hooks = [layer.register_forward_hook(lambda *_, i=i: layer_calls.__setitem__(i, layer_calls[i] + 1))
             for i, layer in enumerate(language.layers)]
    try:
        yield layer_calls, calls
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_runs_once_and_attention_stays_sdpa(vlm, case, monkeypatch):
    ids, mask = vf.batch(vlm.prompts)
    with counted_calls(vlm.model.model.language_model, monkeypatch) as (layer_calls, calls), tr.apply(vlm.model, CASES[case][1]):
        with torch.no_grad():
            vlm.model(input_ids=ids, attention_mask=mask, **vlm.images())
            assert layer_calls == [1] * LAYERS and calls == list(range(LAYERS))
            vlm.model.generate(input_ids=ids, attention_mask=mask, **vlm.images(), max_new_tokens=4, do_sample=False)
    assert layer_calls == [5] * LAYERS  # one prefill + 3 decode steps, each layer once per forward
    assert calls == list(range(LAYERS)) * 5


def test_fastv_keeps_the_top_of_the_eager_attention_row_of_layer_k_minus_1(model, prompts):
    """Independent check: the eager model's attention of the last token at layer K-1, head mean, top-k over image columns."""
    keep, layer = 40, 2
    ids, mask = vf.batch(prompts)  # left padding: the last column is every sample's last token
    pixels = vf.pixels(3, seed=2)
    row = eager_last_row(model, layer - 1, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    expected = row.masked_fill(ids != vf.IMAGE_TOKEN, -1).topk(keep, dim=-1).indices.sort(dim=-1).values.tolist()
    with tr.apply(model, tr.FastVConfig(layer=layer, keep=keep)) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.stats()["kept"]
    assert kept == {layer: expected}


def test_fastv_defaults_are_the_papers():
    config = tr.FastVConfig()
    assert config.layer == 2 and config.keep is None and config.ratio is None
    with tr.apply(deep_llava(), config) as handle:
        assert handle.method.cuts(576) == [(2, 288)]


def test_prompt_without_image_is_a_no_op_with_a_stats_note(vlm):
    ids, mask = vf.batch([[vf.BOS, 7, 8, 9]])
    vf.assert_text_only_prompt_is_a_no_op(vlm.model, tr.FastVConfig(keep=16), {"input_ids": ids, "attention_mask": mask})


def assert_detached(model) -> None:
    """No hook, probe, forward wrapper or attention switch of the decoder machinery is left on a multimodal model."""
    language = model.model.language_model
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "forward" not in vars(model.model)
    assert not any(layer._forward_pre_hooks or layer.self_attn._forward_pre_hooks for layer in language.layers)
    assert not (language._forward_pre_hooks or language._forward_hooks or model.model._forward_pre_hooks)
    assert not any(layer.self_attn in decoder._OBSERVERS for layer in language.layers)


def untouched(vlm: Batch) -> None:
    assert_detached(vlm.model)
    assert torch.equal(vlm.run()[0], vlm.reference[0])


@pytest.mark.parametrize("config, message", [
    (lambda: tr.FastVConfig(layer=LAYERS), r"layer=4 is out of range; this model's decoder has layers 0..3"),
    (lambda: tr.FastVConfig(layer=9, keep=8), r"layer=9 is out of range"),
    (lambda: tr.FastVConfig(keep=200), r"keep=200 is larger than the 144 reducible tokens"),
])
def test_bad_config_leaves_the_model_untouched(model, llava, config, message):
    with pytest.raises(tr.ConfigError, match=message):
        tr.apply(model, config())
    untouched(llava)


def test_layer_zero_is_refused_before_apply():
    with pytest.raises(tr.ConfigError, match=r"layer=0 is invalid"):
        tr.FastVConfig(layer=0)


def test_a_language_model_off_sdpa_is_refused_untouched(model):
    eager = copy.deepcopy(model)
    eager.config.text_config._attn_implementation = "eager"
    with pytest.raises(tr.UnsupportedModelError, match=r"runs 'eager'; load the model with attn_implementation='sdpa'"):
        tr.apply(eager, tr.FastVConfig())
    assert eager.config.text_config._attn_implementation == "eager" and tr.remove(eager) == 0


def test_static_cache_is_refused(model, prompts, llava):
    from transformers import StaticCache

    ids, mask = vf.batch(prompts)
    with tr.apply(model, tr.FastVConfig(keep=16)):
        with pytest.raises(ValueError, match=r"needs a DynamicCache \(per-layer lengths\), got StaticCache"):
            model(input_ids=ids, attention_mask=mask, pixel_values=vf.pixels(3),
                  past_key_values=StaticCache(config=model.config.text_config, max_cache_len=256))
    untouched(llava)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16(vlm, case):
    vlm = in_dtype(vlm, torch.bfloat16)
    with tr.apply(vlm.model, CASES[case][1]) as handle:
        logits, _ = vlm.run()
        assert handle.stats()["visual_tokens_per_sample"] == [schedule(handle.method, n) for n in vlm.visual]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def eager_last_row(model, layer: int, **inputs) -> torch.Tensor:
    """Head-mean attention row of the last token at ``layer`` of the unreduced model, with eager attention: [B, N].

    The model's own attention (its RoPE, M-RoPE included), so the row is not re-derived here.
    """
    eager = copy.deepcopy(model)
    eager.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    return attentions[layer][:, :, -1].mean(dim=1)


def test_pdrop_first_stage_keeps_the_top_of_the_eager_attention_row_of_its_own_layer(model, prompts):
    """PDrop scores the boundary with layer K's own weights on the hidden states entering K (METHODS.md C2, step 2)."""
    ids, mask = vf.batch(prompts)
    pixels = vf.pixels(3, seed=5)
    row = eager_last_row(model, 2, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    expected = row.masked_fill(ids != vf.IMAGE_TOKEN, -1).topk(36, dim=-1).indices.sort(dim=-1).values.tolist()
    with tr.apply(model, tr.PDropConfig(layers=(2,), ratios=(0.25,))) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert handle.stats()["kept"] == {2: expected}


def test_pdrop_defaults_and_budget_solver():
    facts = {"num_layers": 32, "reducible_tokens": 576}
    method = PDrop(tr.PDropConfig(), facts)
    assert method.cuts(576) == [(8, 288), (16, 144), (24, 72)]  # lambda = 0.5 at [8, 16, 24]: 270 layer-averaged tokens
    assert PDrop(tr.PDropConfig(), {"num_layers": 4, "reducible_tokens": 144}).cuts(144) == [(1, 72), (2, 36), (3, 18)]
    # keep / ratio are T_eq budgets solved like equivalent_tokens: the same schedule for the same T_eq (270 = (1 - 0.53125) * 576)
    for budget in (dict(keep=270), dict(ratio=0.53125), dict(equivalent_tokens=270)):
        assert PDrop(tr.PDropConfig(**budget), facts).cuts(576) == [(8, 288), (16, 144), (24, 72)], budget
    assert PDrop(tr.PDropConfig(keep=271), facts).cuts(576) == PDrop(tr.PDropConfig(equivalent_tokens=271), facts).cuts(576)
    assert PDrop(tr.PDropConfig(ratio=0.0), facts).cuts(576) == [(8, 576), (16, 576), (24, 576)]
    with pytest.raises(tr.ConfigError, match=r"keep=100 is out of reach for this prompt \(576 visual tokens\): its schedules reach keep 144 \(lam=0\) to 576 \(lam=1\)"):
        PDrop(tr.PDropConfig(keep=100), facts)
    with pytest.raises(tr.ConfigError, match=r"ratio=0.8 is out of reach for this prompt \(576 visual tokens\): its schedules reach ratio 0.75 \(lam=0\) to 0 \(lam=1\)"):
        PDrop(tr.PDropConfig(ratio=0.8), facts)


@pytest.mark.parametrize("config, message", [
    (lambda: tr.PDropConfig(layers=(2, 1)), r"layers=\(2, 1\) must be strictly increasing"),
    (lambda: tr.PDropConfig(layers=(1, 1)), r"layers=\(1, 1\) must be strictly increasing"),
    (lambda: tr.PDropConfig(layers=(1, 2), ratios=(0.25, 0.5)), r"ratios=\(0.25, 0.5\) must not increase"),
    (lambda: tr.PDropConfig(layers=(1, 2), ratios=(0.5,)), r"one retention per cut \(2 cuts\)"),
    (lambda: tr.PDropConfig(ratios=(0.5, 0.25)), r"one retention per cut \(3 cuts\)"),
    (lambda: tr.PDropConfig(layers=(1,), ratios=(1.5,)), r"ratios\[0\]=1.5 is invalid"),
    (lambda: tr.PDropConfig(lam=1.5), r"lam=1.5 is invalid"),
    (lambda: tr.PDropConfig(layers=(1,), ratios=(0.5,), keep=10), r"give at most one budget of keep, ratio, ratios, .*; got keep=10, ratios=\(0.5,\)"),
    (lambda: tr.DARTConfig(image_pivots=0, text_pivots=0), r"at least one pivot"),
    (lambda: tr.DARTConfig(layer=0), r"layer=0 is invalid"),
    (lambda: tr.SparseVLMConfig(schedule=(50, 100, 20)), r"schedule=\(50, 100, 20\) must not increase"),
    (lambda: tr.SparseVLMConfig(schedule=(50, 20)), r"one kept count per pruning layer \(3\)"),
    (lambda: tr.SparseVLMConfig(schedule=(50, 0, 0)), r"kept counts are ints >= 1"),
    (lambda: tr.SparseVLMConfig(keep=100), r"keep=100 has no official v1.5 schedule; use one of \[64, 128, 192\]"),
    (lambda: tr.SparseVLMConfig(mode="v2", keep=96), r"keep=96 has no official v2 schedule; use one of \[64, 128, 192\]"),
    (lambda: tr.SparseVLMConfig(mode="v3"), r"mode='v3' is invalid; accepted: v1.5, v2"),
    (lambda: tr.SparseVLMConfig(mode="v2", recycle=True), r"recycle=True is invalid with mode='v2'; SparseVLM\+ does not recycle"),
    (lambda: tr.SparseVLMConfig(recycle="yes"), r"recycle='yes' is invalid; accepted: True, False or None"),
    (lambda: tr.SparseVLMConfig(layers=(6, 2, 15)), r"layers=\(6, 2, 15\) must be strictly increasing"),
    (lambda: tr.FiCoCoLConfig(r=3, keep=10), r"give at most one budget of r, keep, ratio, .*; got r=3, keep=10"),
    (lambda: tr.FiCoCoLConfig(beta=1.5), r"beta=1.5 is invalid"),
    (lambda: tr.FiCoCoLConfig(task="both"), r"task='both' is invalid; accepted: text_to_visual, visual_to_text"),
    (lambda: tr.FiCoCoLConfig(compress="mean"), r"compress='mean' is invalid"),
    (lambda: tr.FiCoCoLConfig(start_layer=-1), r"start_layer=-1 is invalid"),
])
def test_bad_schedules_are_refused(config, message):
    with pytest.raises(tr.ConfigError, match=message):
        config()


@pytest.mark.parametrize("config, message", [
    (lambda: tr.PDropConfig(layers=(8, 16, 24)), r"layers\[0\]=8 is out of range; this model's decoder has layers 0..3"),
    (lambda: tr.PDropConfig(layers=(1, 4)), r"layers\[1\]=4 is out of range"),
    (lambda: tr.DARTConfig(layer=4), r"layer=4 is out of range"),
    (lambda: tr.SparseVLMConfig(layers=(2, 6, 15)), r"layers\[1\]=6 is out of range; this model's decoder has layers 0..3 and a pruning layer needs a layer after it \(<= 2\)"),
    (lambda: tr.SparseVLMConfig(schedule=(200, 100, 50)), r"schedule=\(200, 100, 50\) keeps more than the 144 visual tokens"),
    (lambda: tr.FiCoCoLConfig(), r"start_layer=4 leaves no layer to reduce in this 4-layer decoder"),
    (lambda: tr.FiCoCoLConfig(start_layer=0, r=100), r"cannot remove 200 of 144 tokens over 2 layers"),
])
def test_cut_layers_beyond_the_decoder_leave_the_model_untouched(model, llava, config, message):
    with pytest.raises(tr.ConfigError, match=message):
        tr.apply(model, config())
    untouched(llava)


def test_dart_defaults_and_exact_budget():
    config = tr.DARTConfig()
    assert (config.layer, config.image_pivots, config.text_pivots) == (2, 4, 4)
    assert DART(config, {"num_layers": 32, "reducible_tokens": 576}).cuts(576) == [(2, 128)]  # reduction_ratio 0.778


def test_dart_keeps_the_image_pivots_read_from_the_kv_cache(model, prompts):
    """The 4 image tokens with the largest L1 key norm at layer K-1 (keys from an unreduced run's cache, as the reference reads them)."""
    ids, mask = vf.batch(prompts)
    pixels = vf.pixels(3, seed=6)
    with torch.no_grad():
        keys = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True).past_key_values.layers[1].keys
    norms = keys.transpose(1, 2).flatten(2).abs().sum(dim=-1).masked_fill(ids != vf.IMAGE_TOKEN, -1)
    pivots = norms.topk(4, dim=-1).indices
    with tr.apply(model, tr.DARTConfig(layer=2, keep=30)) as handle:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        kept = handle.stats()["kept"][2]
    assert all(len(row) == 30 and set(p.tolist()) <= set(row) for row, p in zip(kept, pivots))


def test_least_duplicated_takes_turns_and_skips_taken_tokens():
    pivots = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    candidates = torch.tensor([[[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [1.0, -1.0]]])
    # pivot 0 (x axis) takes the two least x-like: 2 (-x) then 1 (y); pivot 1 (y axis) then takes 4 (-y), not 2 again
    assert least_duplicated(pivots, candidates, torch.tensor([[2, 1]])).tolist() == [[1, 2, 4]]
    assert least_duplicated(pivots, candidates, torch.tensor([[0, 1]])).tolist() == [[4]]


def test_query_rows_attention_masks_before_softmax_and_expands_kv_heads():
    query = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2 heads, 1 row, 2]
    key = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])  # one KV head for both query heads
    valid = torch.tensor([[[True, True, False]]])
    got = query_rows_attention(query, key, 1.0, valid)
    e = torch.e
    head0 = torch.tensor([e, 1.0, 0.0]) / (e + 1)
    head1 = torch.tensor([1.0, e, 0.0]) / (e + 1)
    torch.testing.assert_close(got[0, 0], (head0 + head1) / 2)
