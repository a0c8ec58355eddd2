"""benchmarks/bench_vlm_prefill.py --quick: the whole benchmark pipeline on a tiny LLaVA, in seconds."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import benchmark_script

METHODS = ["fastervlm", "visionzip", "divprune", "random", "ficoco_v"]


@pytest.fixture(scope="module")
def bench():
    """The script as a module (its folder on sys.path, as when it is run, so ``import common`` works)."""
    with benchmark_script("bench_vlm_prefill") as module:
        yield module


def test_quick_run_reports_every_method(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    results = bench.main(["--quick", "--methods", *METHODS, "--repeats", "1", "--warmup", "0", "--profile-forwards", "1",
                          "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "meas/ideal" in printed and "FLOPs cross-check" in printed and "Where the time goes" in printed
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(results["summary"], default=str))
    assert results["skipped"] == {}
    rows = {r["name"]: r for r in results["summary"]}
    assert list(rows) == ["base", *METHODS]
    shape, keep = bench.QUICK, bench.QUICK.keep
    prompt = results["prompt_tokens"]
    assert rows["base"]["visual_tokens"] == shape.patches and rows["base"]["sequence"] == prompt
    for name in METHODS:
        row = rows[name]
        assert row["visual_tokens"] == keep and row["sequence"] == prompt - shape.patches + keep
        assert row["ideal_speedup"] > 1.0 and row["median_ms"] > 0
        assert row["overhead_ms"] > 0  # the tokenreduce.reduce range was found in the profile
        assert row["shrink_ms"] is not None  # the placeholder-shrinking range too
    # the per-layer formula explains the unreduced model exactly; a method adds at most its own small matmuls
    flops = results["flops"]
    assert flops["base"]["residual"] == 0
    for name in METHODS:
        assert 0 <= flops[name]["residual"] < 0.1 * flops[name]["total"]
