"""Method-specific behaviour beyond the contract: what runs, what is skipped, what the adapter's table assumes."""

from __future__ import annotations

import dit_fixtures as fx
import pytest
import torch

import tokenreduce as tr
from tokenreduce.diffusion import DeltaDiTConfig, FirstBlockCacheConfig, FORAConfig, TaylorSeerConfig, TeaCacheConfig, ToMeDiTConfig


@pytest.fixture(scope="module")
def models():
    return {name: fx.build(name) for name in fx.NAMES}


def first_attention_of(block):
    return block.attn1 if hasattr(block, "attn1") else block.attn


@pytest.mark.parametrize("name", fx.NAMES)
def test_teacache_indicator_is_the_input_the_first_attention_really_receives(models, name, monkeypatch):
    """The adapter recomputes block 0's modulated input (BLOCKS[...].modulated); it must equal what the block feeds its attention."""
    from tokenreduce.methods.teacache import method as teacache

    model, seen, indicator = models[name], [], []
    decide = teacache.TeaCache._decide
    monkeypatch.setattr(teacache.TeaCache, "_decide", lambda self, run, call: (indicator.append(call.modulated()), decide(self, run, call))[1])
    attention = first_attention_of(model.transformer_blocks[0])
    hook = attention.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with tr.apply(model, TeaCacheConfig(threshold=0.0)):
            fx.sample(model, name, fx.latents(name, 2), fx.condition(name, 2), steps=2)
    finally:
        hook.remove()
    assert len(indicator) == len(seen) == 2
    for got, real in zip(indicator, seen):
        assert torch.equal(got, real)


def calls_per_block(model):
    counts = [0] * len(model.transformer_blocks)
    hooks = [first_attention_of(block).register_forward_pre_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1)) for i, block in enumerate(model.transformer_blocks)]
    return counts, hooks


def test_first_block_cache_skips_every_later_block_once_all_samples_agree(models):
    model = models["dit"]
    counts, hooks = calls_per_block(model)
    try:
        with tr.apply(model, FirstBlockCacheConfig(threshold=1e9)) as handle:
            fx.sample(model, "dit", fx.latents("dit", 2), fx.condition("dit", 2), steps=5)
            stats = handle.stats()
    finally:
        for h in hooks:
            h.remove()
    assert counts == [5, 1]  # block 0 every step, block 1 only at the first step
    assert stats["full_steps"] == 1 and stats["partial_steps"] == 4 and stats["skipped_samples"] == 8


def test_delta_dit_caches_the_rear_blocks_early_and_the_front_blocks_late(models):
    model = models["dit"]
    counts, hooks = calls_per_block(model)
    per_step = []
    try:
        with tr.apply(model, DeltaDiTConfig(interval=2, blocks=1, boundary=0.5, num_steps=6)):
            x, cond = fx.latents("dit", 1), fx.condition("dit", 1)
            with torch.no_grad():
                for t in fx.timesteps("dit", 6):
                    before = list(counts)
                    fx.call(model, "dit", x, t, cond)
                    per_step.append([c - b for c, b in zip(counts, before)])
    finally:
        for h in hooks:
            h.remove()
    # full at 0, 2, 4; step 1 (outline stage) skips the rear block, steps 3 and 5 (detail stage) the front block
    assert per_step == [[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [0, 1]]


def test_tome_dit_attention_sees_the_merged_tokens_and_stats_count_them(models):
    model = models["pixart"]
    sizes = []
    hooks = [block.attn1.to_q.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[1])) for block in model.transformer_blocks]
    try:
        with tr.apply(model, ToMeDiTConfig(ratio=0.25)) as handle:
            fx.sample(model, "pixart", fx.latents("pixart", 2), fx.condition("pixart", 2), steps=3)
            stats = handle.stats()
    finally:
        for h in hooks:
            h.remove()
    assert sizes == [64 - 16] * 6
    assert stats["merged_tokens"] == 3 * 2 * 2 * 16


def test_taylorseer_order_zero_is_plain_reuse_and_order_one_extrapolates(models):
    model = models["sd3"]
    x, cond = fx.latents("sd3", 1), fx.condition("sd3", 1)
    outs = {}
    for order in (0, 1):
        with tr.apply(model, TaylorSeerConfig(interval=3, order=order, warmup=2)) as handle:
            outs[order] = fx.sample(model, "sd3", x, cond, steps=6)
            stats = handle.stats()
        assert stats["full_steps"] == 3 and stats["partial_steps"] == 3  # steps 0, 1, 4 full
    assert not torch.equal(outs[0], outs[1])


def test_handle_reset_starts_a_new_generation_for_single_step_runs(models):
    """The same timestep twice reads as the second CFG branch; reset() in between makes it a new generation."""
    model, x, cond = models["dit"], fx.latents("dit", 1), fx.condition("dit", 1)
    with tr.apply(model, FORAConfig()) as handle, torch.no_grad():
        fx.call(model, "dit", x, 999, cond)
        fx.call(model, "dit", x, 999, cond)
        assert handle.stats()["cfg_branches"] == 2
        handle.reset()
        assert handle.stats()["forwards"] == 0 and handle.stats()["cache_bytes"] == 0
        fx.call(model, "dit", x, 999, cond)
        assert handle.stats()["generations"] == 1 and handle.stats()["cfg_branches"] == 1
