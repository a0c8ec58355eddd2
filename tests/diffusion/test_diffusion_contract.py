"""The contract every diffusion method honours on every tiny transformer (DiT, PixArt, Flux, SD3).

Adding a method means one entry in CASES: its zero-strength config (must equal
the uncached model bit for bit) and an active config for 6-step generations.
"""

from __future__ import annotations

import dataclasses

import dit_fixtures as fx
import pytest
import torch

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.diffusion import (
    DeltaDiTConfig,
    DuCaConfig,
    FirstBlockCacheConfig,
    FORAConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    ToCaConfig,
    ToMeDiTConfig,
)

STEPS = 6

CASES = {
    "fora": (FORAConfig(interval=1), FORAConfig(interval=3)),
    "toca": (ToCaConfig(interval=1, num_steps=STEPS), ToCaConfig(fresh_ratio=0.3, num_steps=STEPS)),
    "duca": (DuCaConfig(interval=1, num_steps=STEPS), DuCaConfig(fresh_ratio=0.3, num_steps=STEPS)),
    "toca_constant": (ToCaConfig(preset="constant", fresh_ratio=1.0), ToCaConfig(preset="constant", fresh_ratio=0.25, interval=2)),
    "teacache": (TeaCacheConfig(threshold=0.0), TeaCacheConfig(threshold=0.3, num_steps=STEPS)),
    "first_block_cache": (FirstBlockCacheConfig(threshold=0.0), FirstBlockCacheConfig(threshold=0.5)),
    "taylorseer": (TaylorSeerConfig(interval=1), TaylorSeerConfig(interval=2, order=2, warmup=2)),
    "delta_dit": (DeltaDiTConfig(interval=1), DeltaDiTConfig(interval=2, blocks=1, num_steps=STEPS)),
    "tome_dit": (ToMeDiTConfig(ratio=0.0), ToMeDiTConfig(ratio=0.5)),
}
UNSUPPORTED = {("tome_dit", "flux")}
PAIRS = [(case, name) for case in CASES for name in fx.NAMES if (case, name) not in UNSUPPORTED]


def test_every_diffusion_method_has_a_contract_case():
    diffusion = {c.method for c in registry.method_configs() if "dit" in registry.method_for_class(c).sites}
    assert diffusion == {zero.method for zero, _ in CASES.values()}


@pytest.fixture(scope="module", params=fx.NAMES)
def fixture_name(request):
    return request.param


@pytest.fixture(scope="module")
def model(fixture_name):
    return fx.build(fixture_name)


@pytest.fixture(scope="module")
def inputs(fixture_name):
    return fx.latents(fixture_name, 2), fx.condition(fixture_name, 2)


@pytest.fixture(scope="module")
def reference(model, fixture_name, inputs):
    return fx.sample(model, fixture_name, *inputs, steps=STEPS, cfg="batched")


def run(model, name, inputs, cfg="batched"):
    return fx.sample(model, name, *inputs, steps=STEPS, cfg=cfg)


def skip_unsupported(case, fixture_name):
    if (case, fixture_name) in UNSUPPORTED:
        pytest.skip(f"{case} does not support {fixture_name} (tested in test_errors)")


def processors(model):
    return [getattr(m, "processor", None) for m in model.modules()]


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact_active_differs_and_remove_restores(model, fixture_name, inputs, reference, case):
    skip_unsupported(case, fixture_name)
    zero, active = CASES[case]
    before = processors(model)
    with tr.apply(model, zero):
        assert torch.equal(run(model, fixture_name, inputs), reference)
    handle = tr.apply(model, active)
    first = run(model, fixture_name, inputs)
    second = run(model, fixture_name, inputs)  # a second generation without reset() starts fresh
    stats = handle.stats()
    assert processors(model) == before  # attention processors (SDPA) untouched
    handle.remove()
    assert torch.isfinite(first).all() and not torch.equal(first, reference)
    assert torch.equal(first, second)
    assert stats["generations"] == 2 and stats["forwards"] == 2 * STEPS and stats["steps"] == STEPS
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(run(model, fixture_name, inputs), reference)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_equals_samples_one_by_one(model, fixture_name, case):
    skip_unsupported(case, fixture_name)
    x, cond = fx.latents(fixture_name, 2, seed=1), fx.condition(fixture_name, 2, seed=7)
    with tr.apply(model, CASES[case][1]):
        batch = run(model, fixture_name, (x, cond))
        single = torch.cat([run(model, fixture_name, (x[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()})) for i in range(2)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_cfg_branches_have_separate_caches(model, fixture_name, inputs, case):
    """Two calls per step (cond, then uncond) give what one doubled batch gives: each branch reads its own caches."""
    skip_unsupported(case, fixture_name)
    config = CASES[case][1]
    if isinstance(config, ToCaConfig):  # a doubled batch may share selections between halves; two calls cannot
        config = dataclasses.replace(config, shared_selection_across_cfg=False)
    with tr.apply(model, config) as handle:
        batched = run(model, fixture_name, inputs, cfg="batched")
        sequential = run(model, fixture_name, inputs, cfg="sequential")
        branches = handle.stats()["cfg_branches"]
    torch.testing.assert_close(sequential, batched, rtol=1e-4, atol=1e-4)
    assert branches in (0, 2)  # 0: a method without caches (ToMe)


@pytest.mark.parametrize("case", list(CASES))
def test_double_apply_raises_and_leaves_model_unchanged(model, fixture_name, inputs, reference, case):
    skip_unsupported(case, fixture_name)
    with tr.apply(model, CASES[case][1]):
        with pytest.raises(tr.AlreadyAppliedError, match="already has"):
            tr.apply(model, FORAConfig())
    assert torch.equal(run(model, fixture_name, inputs), reference)


@pytest.fixture(scope="module")
def bf16_model(fixture_name):
    return fx.build(fixture_name, torch.bfloat16)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16(bf16_model, fixture_name, case):
    skip_unsupported(case, fixture_name)
    x, cond = fx.latents(fixture_name, 1, dtype=torch.bfloat16), fx.condition(fixture_name, 1, dtype=torch.bfloat16)
    reference = fx.sample(bf16_model, fixture_name, x, cond, steps=STEPS)
    zero, active = CASES[case]
    with tr.apply(bf16_model, zero):
        assert torch.equal(fx.sample(bf16_model, fixture_name, x, cond, steps=STEPS), reference)
    with tr.apply(bf16_model, active):
        out = fx.sample(bf16_model, fixture_name, x, cond, steps=STEPS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
