"""Budgets of in-LLM methods (METHODS.md sec. E2, E4, E5): equivalent_tokens and tflops solved into each method's schedule.

Solver tests use LLaVA-1.5-7B's shape (576 visual tokens of a 640-token prompt,
Vicuna-7B's 32 layers); the end-to-end tests use the 4-layer LLaVA fixture.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
import vlm_fixtures as vf
from test_inllm_contract import LAYERS, TEXTS, check_padded_batch_equals_samples_one_by_one, deep_llava, llava_batch

import tokenreduce as tr
from tokenreduce.adapters.decoder import decoder_shape
from tokenreduce.budget import solve_knob
from tokenreduce.errors import ConfigError
from tokenreduce.measure import count_flops
from tokenreduce.methods.dart import DART
from tokenreduce.methods.fastv import FastV
from tokenreduce.methods.ficoco.language import FiCoCoL
from tokenreduce.methods.inllm import DecoderShape, DecoderMethod
from tokenreduce.methods.pdrop import PDrop
from tokenreduce.methods.sparsevlm import SparseVLM
from tokenreduce.methods.sparsevlm.recycling import with_recycling

VICUNA_7B = DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, layers=32, mlp_matrices=3)
FACTS = {"num_layers": 32, "reducible_tokens": 576, "decoder": VICUNA_7B}
VISUAL, LENGTH = 576, 640
METHODS = {"fastv": (FastV, tr.FastVConfig), "dart": (DART, tr.DARTConfig), "pdrop": (PDrop, tr.PDropConfig),
           "sparsevlm": (SparseVLM, functools.partial(tr.SparseVLMConfig, recycle=False)),
           "sparsevlm_recycling": (SparseVLM, tr.SparseVLMConfig), "ficoco_l": (FiCoCoL, tr.FiCoCoLConfig)}
# targets each method reaches on this shape: PDrop's first cut at layer 8 bounds T_eq below by 144, FiCoCo-L's
# linear removal from layer 6 by 332
TARGETS = {"fastv": (192, 128, 64), "dart": (192, 128, 64), "pdrop": (270, 192, 150),
           "sparsevlm": (192, 128, 64, 100), "sparsevlm_recycling": (192, 128, 64), "ficoco_l": (480, 400, 340)}
CASES = [(name, target) for name, targets in TARGETS.items() for target in targets]


def build(name: str, **budget) -> DecoderMethod:
    method, config = METHODS[name]
    return method(config(**budget), FACTS)


def assert_best_in_family(method: DecoderMethod, measure, target: float, cuts) -> None:
    """No schedule of the method's family (every integer, or a grid of a continuous knob) lies above the solved one within the target."""
    achieved = measure(cuts)
    assert achieved <= target
    knob = method.knob(VISUAL, measure, target)
    grid = range(int(knob.low), int(knob.high) + 1) if knob.integer else np.linspace(knob.low, knob.high, 2001)
    values = [measure(knob.schedule(x)) for x in grid]
    assert not [v for v in values if achieved < v <= target]  # the next step up exceeds the target


@pytest.mark.parametrize("name, target", CASES)
def test_equivalent_tokens_are_met_within_one_token(name, target):
    method = build(name, equivalent_tokens=target)
    cuts = method.cuts(VISUAL)
    achieved = method.equivalent_tokens(VISUAL, cuts)
    assert target - 1 < achieved <= target
    assert_best_in_family(method, lambda c: method.equivalent_tokens(VISUAL, c), target, cuts)


@pytest.mark.parametrize("name, target", CASES)
def test_tflops_are_met_and_one_step_more_exceeds_them(name, target):
    """The FLOPs target of the T_eq case's schedule, lowered a little: the solver lands on or just below it."""
    schedule = build(name, equivalent_tokens=target)
    tflops = schedule.prefill_flops(VISUAL, LENGTH, schedule.cuts(VISUAL)) / 1e12 - 0.01
    method = build(name, tflops=tflops)
    cuts = method.cuts(VISUAL, LENGTH)
    assert method.prefill_flops(VISUAL, LENGTH, cuts) <= tflops * 1e12
    assert_best_in_family(method, lambda c: method.prefill_flops(VISUAL, LENGTH, c), tflops * 1e12, cuts)


def test_fastv_inverts_the_e4_example():
    """(2 * 576 + 30 * 144) / 32 = 171 for K = 2, R = 0.75 (sec. E4): T_eq 171 gives back keep = 144."""
    assert build("fastv", ratio=0.75).cuts(VISUAL) == [(2, 144)]
    assert build("fastv", equivalent_tokens=171).cuts(VISUAL) == [(2, 144)]
    assert build("fastv", equivalent_tokens=170.9).cuts(VISUAL) == [(2, 143)]


def test_pdrop_solves_the_closed_form_lambda():
    """(1 + l + l^2 + l^3) / 4 = 270 / 576 at [8, 16, 24] of 32 layers: l = 0.5 (sec. E5)."""
    method = build("pdrop", equivalent_tokens=270)
    measure = lambda c: method.equivalent_tokens(VISUAL, c)  # noqa: E731
    lam, cuts = solve_knob(method.knob(VISUAL, measure, 270), measure, 270)
    assert lam == pytest.approx(0.5, abs=1e-6)
    assert (1 + lam + lam**2 + lam**3) / 4 == pytest.approx(270 / 576, abs=1e-6)
    assert cuts == method.cuts(VISUAL) == [(8, 288), (16, 144), (24, 72)]


@pytest.mark.parametrize("setting, published, t_eq", [
    (192, [(3, 300), (7, 200), (16, 110)], 202.75),
    (128, [(3, 303), (7, 110), (16, 36)], 140.8125),
    (64, [(3, 66), (7, 30), (16, 17)], 79.1875),
])
def test_sparsevlm_published_schedules_are_the_fixed_points_of_their_own_t_eq(setting, published, t_eq):
    """The "192 / 128 / 64" settings average 202.75 / 140.81 / 79.19 visual tokens over the layers (issues #29 / #33)."""
    by_setting = build("sparsevlm", keep=setting)
    assert by_setting.cuts(VISUAL) == published and by_setting.equivalent_tokens(VISUAL, published) == t_eq
    assert build("sparsevlm", equivalent_tokens=t_eq).cuts(VISUAL) == published
    recycling = build("sparsevlm_recycling", keep=setting)  # v1.5's default: the recycled clusters survive too and count
    assert recycling.cuts(VISUAL) == with_recycling(VISUAL, published)
    assert recycling.equivalent_tokens(VISUAL, recycling.cuts(VISUAL)) > t_eq


@pytest.mark.parametrize("name, floor", [("fastv", 36), ("pdrop", 144), ("sparsevlm", 54.91), ("ficoco_l", 332.3)])
def test_unreachable_targets_say_the_reachable_range(name, floor):
    first = dict(fastv=2, pdrop=8, sparsevlm=3, ficoco_l=6)[name]
    message = (rf"equivalent_tokens=20 is out of reach for this prompt \(576 visual tokens\): its schedules reach "
               rf"equivalent_tokens {re.escape(str(floor))} \(\w+=0?\.?\d*\) to 576 .*cutting from layer {first} of a "
               r"32-layer decoder; the layers before the first cut see all 576 visual tokens")
    with pytest.raises(ConfigError, match=message):
        build(name, equivalent_tokens=20)


def test_a_tflops_target_below_the_reach_is_refused_at_the_prefill():
    method = build("fastv", tflops=0.3)  # no length at apply: nothing to check yet
    with pytest.raises(ConfigError, match=r"tflops=0.3 is out of reach for this prompt \(576 visual tokens of 640\): its schedules reach tflops 1\.311 \(keep=0\) to 8\.504 \(keep=576\)"):
        method.cuts(VISUAL, LENGTH)


def test_a_target_above_the_unreduced_model_runs_unreduced():
    assert build("fastv", equivalent_tokens=1000).cuts(VISUAL) == [(2, 576)]
    assert build("pdrop", tflops=100.0).cuts(VISUAL, LENGTH) == [(8, 576), (16, 576), (24, 576)]


@pytest.mark.parametrize("config, given", [
    (lambda: tr.FastVConfig(keep=10, equivalent_tokens=100), "keep=10, equivalent_tokens=100"),
    (lambda: tr.DARTConfig(ratio=0.5, tflops=2.0), "ratio=0.5, tflops=2.0"),
    (lambda: tr.PDropConfig(ratios=(0.5, 0.25, 0.1), equivalent_tokens=100), r"ratios=\(0.5, 0.25, 0.1\), equivalent_tokens=100"),
    (lambda: tr.SparseVLMConfig(keep=64, tflops=2.0), "keep=64, tflops=2.0"),
    (lambda: tr.SparseVLMConfig(schedule=(9, 8, 7), equivalent_tokens=100), r"schedule=\(9, 8, 7\), equivalent_tokens=100"),
    (lambda: tr.FiCoCoLConfig(r=3, tflops=2.0), "r=3, tflops=2.0"),
    (lambda: tr.FastVConfig(equivalent_tokens=100, tflops=2.0), "equivalent_tokens=100, tflops=2.0"),
])
def test_conflicting_budgets_are_refused_by_name(config, given):
    with pytest.raises(ConfigError, match=rf"give at most one budget of .*; got {given}$"):
        config()


@pytest.mark.parametrize("value", [0, -1, float("inf"), True, "100"])
def test_budget_values_are_checked(value):
    with pytest.raises(ConfigError, match=r"equivalent_tokens=.* is invalid; expected a finite number > 0"):
        tr.FastVConfig(equivalent_tokens=value)


def test_decoder_flops_count_an_explicit_head_dim_at_the_attention_width():
    """heads x head_dim != hidden: DecoderShape's layer FLOPs still equal FlopCounterMode's count of a Llama layer (CPU SDPA)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    hidden = torch.randn(1, 37, config.hidden_size)
    embeddings = LlamaRotaryEmbedding(config)(hidden, torch.arange(37)[None])
    with torch.no_grad():
        report = count_flops(lambda: layer(hidden, attention_mask=None, position_embeddings=embeddings))
    assert report.total == decoder_shape(config).layer_flops(37)


@pytest.fixture(scope="module")
def model():
    return deep_llava()


@pytest.fixture(scope="module")
def inputs():
    ids, mask = vf.batch([vf.prompt(before, after) for before, after in TEXTS])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": vf.pixels(len(TEXTS))}


def layer_flops(model, inputs) -> int:
    """FlopCounterMode's count of the decoder layers' forward (the LM head and the vision side excluded)."""
    with torch.no_grad():
        report = count_flops(lambda: model(**inputs))
    return sum(v for k, v in report.by_module.items() if re.fullmatch(r".*\.language_model\.layers\.\d+", k))


def test_stats_flops_equal_the_flop_counter_on_the_decoder_layers(model, inputs):
    """prefill_flops_full is the unreduced count; prefill_flops the reduced one plus FastV's score row (outside its scope)."""
    full = layer_flops(model, inputs)
    with tr.apply(model, tr.FastVConfig(layer=2, keep=40)) as handle:
        reduced = layer_flops(model, inputs)
        stats = handle.stats()
    batch, length = inputs["input_ids"].shape
    config = model.config.text_config
    score_row = 2 * batch * config.num_attention_heads * length * (config.hidden_size // config.num_attention_heads)  # q . K at layer 1
    assert stats["visual_tokens_per_layer"] == [144, 144, 40, 40]
    assert stats["prefill_flops_full"] == full
    assert stats["prefill_flops"] + score_row == reduced
    assert stats["prefill_flops_ratio"] == stats["prefill_flops"] / full < 1


@pytest.mark.parametrize("config, per_layer", [
    (tr.FastVConfig(layer=2, equivalent_tokens=80), [144, 144, 16, 16]),  # (2 * 144 + 2 * 16) / 4 = 80
    (tr.PDropConfig(equivalent_tokens=67.5), [144, 72, 36, 18]),  # 144 (1 + l + l^2 + l^3) / 4 = 67.5 at l = 1/2
    (tr.FiCoCoLConfig(start_layer=0, equivalent_tokens=120), [144, 144, 112, 80]),  # keep 80: 64 removed as 32 + 32
])
def test_equivalent_tokens_end_to_end(model, inputs, config, per_layer):
    with tr.apply(model, config) as handle:
        with torch.no_grad():
            model(**inputs)
        stats = handle.stats()
    assert stats["visual_tokens_per_layer"] == per_layer
    assert stats["equivalent_tokens"] == sum(per_layer) / LAYERS <= config.equivalent_tokens


def test_tflops_end_to_end_is_solved_at_the_prefill(model):
    """Prompts of one length: each sample is solved at that length (padded batches: the per-sample test below)."""
    texts = [(before, after) for before, after in TEXTS if len(before) + len(after) == 5]
    ids, mask = vf.batch([vf.prompt(before, after) for before, after in texts])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": vf.pixels(len(texts))}
    batch, length = inputs["input_ids"].shape
    assert batch > 1
    shape = decoder_shape(model.config.text_config)
    keep_50 = shape.prefill_flops([length] * 2 + [length - 144 + 50] * 2)
    with tr.apply(model, tr.FastVConfig(layer=2, tflops=keep_50 / 1e12)) as handle:
        with torch.no_grad():
            model(**inputs)
        stats = handle.stats()
    assert stats["visual_tokens_per_layer"] == [144, 144, 50, 50]
    assert stats["prefill_flops"] == batch * keep_50
    with tr.apply(model, tr.FastVConfig(layer=2, tflops=1e-9)):
        with pytest.raises(ConfigError, match=r"tflops=1e-09 is out of reach"):
            model(**inputs)


def test_a_tflops_budget_is_solved_for_each_sample_of_a_padded_batch(model):
    """Prompts of different lengths, left-padded: each is solved at its own length, so the batch equals its samples (0.5.7).

    The target keeps 50 of the shortest prompt's 144 visual tokens; solved at the
    padded length, that sample would keep fewer.
    """
    llava = llava_batch(model, [1, 1, 1])
    shortest = min(map(len, llava.prompts))
    assert shortest < max(map(len, llava.prompts))
    keep_50 = decoder_shape(model.config.text_config).prefill_flops([shortest] * 2 + [shortest - 144 + 50] * 2)
    config = tr.FastVConfig(layer=2, tflops=keep_50 / 1e12)
    check_padded_batch_equals_samples_one_by_one(llava, config, "left")
    with tr.apply(model, config) as handle:
        llava.run()
        kept = [len(row) for row in handle.stats()["kept"][2]]
    assert [k for k, prompt in zip(kept, llava.prompts) if len(prompt) == shortest] == [50]
    assert all(k < 50 for k, prompt in zip(kept, llava.prompts) if len(prompt) > shortest)


def test_an_unreachable_equivalent_token_count_is_refused_at_apply(model):
    with pytest.raises(ConfigError, match=r"reach equivalent_tokens 72 \(keep=0\) to 144 \(keep=144\), cutting from layer 2 of a 4-layer"):
        tr.apply(model, tr.FastVConfig(layer=2, equivalent_tokens=50))


def test_a_tflops_budget_needs_an_adapter_that_describes_the_decoder():
    with pytest.raises(ConfigError, match=r"FastVConfig: tflops needs the decoder's dimensions"):
        FastV(tr.FastVConfig(tflops=2.0), {"num_layers": 32, "reducible_tokens": 576})
