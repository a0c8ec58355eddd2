"""ModuleTimer and analyse_overhead: per-forward module times and the tokenreduce.reduce range from a profile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenreduce.measure import ModuleTimer, analyse_overhead, oversubscribed, profile_calls
from tokenreduce.merge_slot import OVERHEAD_LABEL


class Reducing(nn.Module):
    """Two linears with a labelled 'reduction' between them, as a method's step would be."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        with torch.profiler.record_function(OVERHEAD_LABEL):
            x = x[:, : x.shape[1] // 2].sort(dim=-1).values
        return self.b(x)


def test_module_timer_groups_times_per_forward():
    model = Reducing()
    timer = ModuleTimer({"a": model.a, "b": model.b})
    x = torch.randn(2, 6, 8)
    for _ in range(3):
        model(x)
    timer.remove()
    model(x)  # hooks removed: no fourth forward recorded
    assert len(timer.forwards) == 3 and all(set(f) == {"a", "b"} and all(v > 0 for v in f.values()) for f in timer.forwards)
    assert timer.last(2) == timer.forwards[1:]
    assert set(timer.medians(3)) == {"a", "b"}


def test_analyse_overhead_finds_the_reduce_range():
    model, x = Reducing(), torch.randn(2, 6, 8)
    prof, wall = profile_calls(lambda: model(x), 3)
    result = analyse_overhead(prof, 3, [1])
    assert wall > 0
    assert result["reduce_ranges_per_forward"] == 1
    assert 0 < result["reduce_ms"] < 1e3 * wall
    assert "aten::sort" in result["inside_ms"] and "aten::addmm" not in result["inside_ms"]
    assert result["reduce_per_layer_ms"] == [pytest.approx(result["reduce_ms"], rel=1e-9)]  # summed in another order
    assert 0 < result["reduce_min_over_forwards_ms"] <= result["reduce_ms"] * 1.0001


def test_oversubscribed_needs_a_slow_multithreaded_probe():
    assert not oversubscribed([{"threads": 2, "median_ms_threads": 0.05, "median_ms_1_thread": 0.04}])
    assert oversubscribed([{"threads": 2, "median_ms_threads": 8.0, "median_ms_1_thread": 0.04}])
    assert not oversubscribed([{"threads": 1, "median_ms_threads": 8.0, "median_ms_1_thread": 8.0}])
