"""DuCa (arXiv 2412.18911): aggressive and conservative partial steps alternate; no attention statistics."""

from __future__ import annotations

import dit_fixtures as fx
import pytest

import tokenreduce as tr
from tokenreduce.diffusion import DuCaConfig, ToCaConfig

STEPS = 6
SHAPE = dict(preset="constant", interval=5, fresh_ratio=0.5)  # full at 0 and 5, partial 1-4; rho 0.5 everywhere


def run(config, name="pixart"):
    model = fx.build(name)
    with tr.apply(model, config) as handle:
        fx.sample(model, name, fx.latents(name, 2), fx.condition(name, 2), steps=STEPS, cfg="batched")
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        return handle.stats(), hooks


@pytest.mark.parametrize("name", fx.NAMES)
def test_partial_steps_alternate_aggressive_and_conservative(name):
    duca, _ = run(DuCaConfig(**SHAPE), name)
    toca, _ = run(ToCaConfig(**SHAPE, score="self_attn"), name)
    assert (duca["full_steps"], duca["partial_steps"], duca["aggressive_steps"]) == (2, 4, 2)  # steps 1, 3 aggressive
    assert duca["refreshed_tokens"] * 2 == toca["refreshed_tokens"]  # the same rho on half of the partial steps
    assert duca["flops_computed"] < toca["flops_computed"]


def test_random_selection_needs_no_attention_probe():
    _, duca_hooks = run(DuCaConfig(**SHAPE))
    _, toca_hooks = run(ToCaConfig(**SHAPE))
    assert duca_hooks == 0 < toca_hooks


def test_selection_repeats_with_the_seed_and_changes_with_it():
    model = fx.build("pixart")
    x, cond = fx.latents("pixart", 1), fx.condition("pixart", 1)
    outs = []
    for seed in (0, 0, 1):
        with tr.apply(model, DuCaConfig(**SHAPE, seed=seed)):
            outs.append(fx.sample(model, "pixart", x, cond, steps=STEPS))
    assert outs[0].equal(outs[1]) and not outs[0].equal(outs[2])


@pytest.mark.parametrize("bad", [dict(score="self_attn"), dict(reference_compat=True), dict(seed=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(tr.ConfigError, match="DuCaConfig"):
        DuCaConfig(**bad)


def test_too_few_steps_for_the_schedule_is_an_error_before_anything_is_attached():
    model = fx.build("flux")
    with pytest.raises(tr.ConfigError, match=r"runs 3 inference steps but this schedule needs at least 4"):
        tr.apply(model, DuCaConfig(preset="flux", num_steps=3))  # Flux: steps 0-2 always full
    assert all("forward" not in m.__dict__ for m in model.modules())
