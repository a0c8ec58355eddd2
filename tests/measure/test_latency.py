"""time_interleaved / Timing / speedup."""

import time

import pytest

from tokenreduce.measure import Timing, speedup, time_interleaved


def test_round_robin_order_with_rotation_after_warmup():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(candidates, warmup=2, repeats=4)
    warmup = list("abc") * 2
    rounds = list("abc") + list("bca") + list("cab") + list("abc")
    assert calls == warmup + rounds
    assert set(timings) == {"a", "b", "c"}
    assert all(len(t.times) == 4 for t in timings.values())


def test_warmup_calls_not_timed():
    calls = {"n": 0}

    def slow_first_calls():
        calls["n"] += 1
        if calls["n"] <= 3:
            time.sleep(0.2)

    timing = time_interleaved({"x": slow_first_calls}, warmup=3, repeats=5)["x"]
    assert calls["n"] == 8
    assert len(timing.times) == 5
    assert max(timing.times) < 0.1


def test_times_are_wall_clock():
    timing = time_interleaved({"sleep": lambda: time.sleep(0.01)}, warmup=0, repeats=3)["sleep"]
    assert timing.min >= 0.01
    assert timing.median < 1.0


def test_timing_statistics():
    timing = Timing((3.0, 1.0, 2.0, 10.0))
    assert timing.min == 1.0
    assert timing.median == 2.5
    assert timing.mean == 4.0
    with pytest.raises(ValueError):
        Timing(())


def test_speedup_uses_medians():
    base = Timing((2.0, 2.0, 100.0))  # one outlier must not matter
    other = Timing((1.0, 1.0, 0.001))
    assert speedup(base, other) == 2.0
    assert speedup(other, base) == 0.5


@pytest.mark.parametrize(
    "candidates, warmup, repeats",
    [({}, 1, 1), ({"a": lambda: None}, -1, 1), ({"a": lambda: None}, 0, 0)],
)
def test_rejects_bad_arguments(candidates, warmup, repeats):
    with pytest.raises(ValueError):
        time_interleaved(candidates, warmup=warmup, repeats=repeats)
