"""The contract every ViT method honours on every ViT-family fixture (DESIGN.md sec. 7).

Adding a method means adding one entry to CASES: its zero-strength config and an
active config that keeps ACTIVE_KEEP patch tokens.
"""

from __future__ import annotations

import pytest
import torch
import vit_fixtures as fx

import tokenreduce as tr

ACTIVE_KEEP = 16

CASES = {
    "tome": (tr.ToMeConfig(r=0), tr.ToMeConfig(keep=ACTIVE_KEEP)),
    "tome_decreasing": (tr.ToMeConfig(ratio=0.0, inflection=-1.0), tr.ToMeConfig(keep=ACTIVE_KEEP, inflection=-1.0)),
    "evit": (tr.EViTConfig(keep_rate=1.0), tr.EViTConfig(keep=ACTIVE_KEEP)),
    "ficoco_v": (tr.FiCoCoVConfig(ratio=0.0), tr.FiCoCoVConfig(keep=ACTIVE_KEEP)),
    "random": (tr.RandomConfig(ratio=0.0), tr.RandomConfig(keep=ACTIVE_KEEP)),
    "uniform": (tr.UniformConfig(ratio=0.0), tr.UniformConfig(keep=ACTIVE_KEEP)),
    "pooling": (tr.PoolingConfig(ratio=0.0), tr.PoolingConfig(keep=ACTIVE_KEEP)),
}


def test_every_vit_method_has_a_contract_case():
    covered = {zero.method for zero, _ in CASES.values()}
    for name in fx.BUILDERS:
        assert covered == set(tr.supported(fx.build(name)))


@pytest.fixture(scope="module", params=list(fx.BUILDERS))
def fixture_name(request):
    return request.param


@pytest.fixture(scope="module")
def model(fixture_name):
    return fx.build(fixture_name)


@pytest.fixture(scope="module")
def reference(model):
    return fx.output(model, fx.images(3))


@pytest.mark.parametrize("case", list(CASES))
def test_zero_strength_is_bit_exact(model, reference, case):
    with tr.apply(model, CASES[case][0]) as handle:
        out = fx.output(model, fx.images(3))
        stats = handle.stats()
    assert torch.equal(out, reference)
    assert stats["tokens_out"] == stats["tokens_in"]


@pytest.mark.parametrize("case", list(CASES))
def test_active_reduces_to_budget_and_remove_restores(model, reference, fixture_name, case):
    handle = tr.apply(model, CASES[case][1])
    out = fx.output(model, fx.images(3))
    stats = handle.stats()
    handle.remove()
    assert stats["tokens_out"] == fx.PROTECTED[fixture_name] + ACTIVE_KEEP
    assert stats["tokens_in"] == fx.PROTECTED[fixture_name] + 64
    assert stats["tokens_per_layer"] == sorted(stats["tokens_per_layer"], reverse=True)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    assert torch.equal(fx.output(model, fx.images(3)), reference)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_equals_samples_one_by_one(model, case):
    pixels = fx.images(3, seed=1)
    with tr.apply(model, CASES[case][1]):
        batch = fx.output(model, pixels)
        single = torch.cat([fx.output(model, pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_double_apply_raises_and_leaves_model_unchanged(model, reference, case):
    with tr.apply(model, CASES[case][1]):
        with pytest.raises(tr.AlreadyAppliedError, match="already has"):
            tr.apply(model, CASES[case][0])
    assert torch.equal(fx.output(model, fx.images(3)), reference)


@pytest.fixture(scope="module")
def bf16_model(fixture_name):
    return fx.build(fixture_name).to(torch.bfloat16)


@pytest.mark.parametrize("case", list(CASES))
def test_bf16(bf16_model, fixture_name, case):
    pixels = fx.images(2).to(torch.bfloat16)
    reference = fx.output(bf16_model, pixels)
    with tr.apply(bf16_model, CASES[case][0]):
        assert torch.equal(fx.output(bf16_model, pixels), reference)
    with tr.apply(bf16_model, CASES[case][1]) as handle:
        out = fx.output(bf16_model, pixels)
        assert handle.stats()["tokens_out"] == fx.PROTECTED[fixture_name] + ACTIVE_KEEP
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
