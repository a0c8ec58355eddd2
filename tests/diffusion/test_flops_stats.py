"""``handle.stats()``'s analytic FLOPs against ``FlopCounterMode`` on every tiny transformer and method.

The adapter counts, call by call, what each cacheable unit would cost uncached
(``flops_full``) and what was really computed (``flops_computed``: recomputed
rows, blocks run, score probes, ToMe's similarity). The formula counts exactly
the products ``FlopCounterMode`` counts (linears and attention), so the stated
tolerance is zero: the sums must be equal.
"""

from __future__ import annotations

import dit_fixtures as fx
import pytest
from test_diffusion_contract import CASES, PAIRS, STEPS

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.diffusion import FORAConfig
from tokenreduce.measure import count_flops


def unit_paths(model) -> set[str]:
    """FlopCounterMode's paths of every cacheable unit (an owned computation: its submodules)."""
    adapter = registry.adapter_for(model)(model)
    names = {module: name for name, module in model.named_modules()}
    root = type(model).__name__
    paths = set()
    for _, block, spec in adapter.layout:
        for unit, module in adapter.units(block, spec):
            parts = spec.owned_modules if module is None else (unit.path,)
            paths |= {f"{root}.{names[block]}.{part}" for part in parts}
    return paths


@pytest.mark.parametrize(("case", "name"), PAIRS)
def test_stats_flops_equal_counted_flops(case, name):
    model = fx.build(name)
    x, cond = fx.latents(name, 2), fx.condition(name, 2)
    with tr.apply(model, CASES[case][1]) as handle:
        report = count_flops(lambda: fx.sample(model, name, x, cond, steps=STEPS, cfg="batched"))
        stats = handle.stats()
    counted = sum(report.by_module.get(path, 0) for path in unit_paths(model))
    uncached = count_flops(lambda: fx.sample(model, name, x, cond, steps=STEPS, cfg="batched"))
    assert stats["flops_computed"] == counted
    assert stats["flops_full"] == sum(uncached.by_module.get(path, 0) for path in unit_paths(model))
    assert stats["flops_ratio"] == stats["flops_computed"] / stats["flops_full"]


def test_fora_ratio_is_its_share_of_full_steps():
    model = fx.build("pixart")
    with tr.apply(model, FORAConfig(interval=3)) as handle:
        fx.sample(model, "pixart", fx.latents("pixart", 1), fx.condition("pixart", 1), steps=STEPS)
        assert handle.stats()["flops_ratio"] == pytest.approx(2 / STEPS)  # steps 0 and 3 of 6 run
        handle.reset()
        assert handle.stats()["flops_ratio"] is None  # nothing run since the reset
