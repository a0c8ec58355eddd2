"""benchmarks/bench_inllm.py --quick: the in-LLM benchmark pipeline on a tiny LLaVA with a 4-layer LLM, in seconds.

The checks are relations a broken pipeline cannot meet by accident: the schedule the
methods report matches FastV's and PyramidDrop's formulas, the tokens every LLM
layer actually received, the counted FLOPs and the KV-cache bytes; every candidate
generates the same number of tokens.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from benchmark_scripts import benchmark_script

FASTV, PDROP = "fastv:layer=2,ratio=0.75", "pdrop"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def bench():
    """The script as a module (its folder on sys.path, as when it is run, so ``import common`` and ``bench_vlm_prefill`` work)."""
    with benchmark_script("bench_inllm", "bench_vlm_prefill") as module:
        yield module


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One quick run: (results, printed report, the JSON file read back); stdout captured here, the fixture is shared."""
    out = tmp_path_factory.mktemp("bench") / "r.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--profile-forwards", "1", "--decode-repeats", "1",
                              "--new-tokens", str(NEW_TOKENS), "--threads", "1", "--json", str(out)])
    return results, printed.getvalue(), json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(run):
    return run[0]


def test_report_structure(run):
    results, printed, written = run
    assert "meas/ideal" in printed and "FLOPs cross-check" in printed and "Decode" in printed and "parallel-op probe" in printed
    assert written["summary"] == json.loads(json.dumps(results["summary"], default=str))
    assert results["skipped"] == {}
    assert [r["name"] for r in results["summary"]] == ["base", FASTV, PDROP]


def test_schedule_matches_the_methods_formulas(bench, results):
    shape, layers = bench.QUICK_INLLM, bench.QUICK_INLLM.layers
    n, prompt = shape.patches, results["prompt_tokens"]
    fastv, pdrop = results["schedule"][FASTV], results["schedule"][PDROP]
    kept = n - round(0.75 * n)
    assert fastv["visual_tokens_per_layer"] == [n, n] + [kept] * (layers - 2)
    assert fastv["equivalent_tokens"] == (2 * n + (layers - 2) * n * (1 - 0.75)) / layers
    # PDrop's default on 4 layers: cuts at 1, 2, 3 keeping lambda^s = 1/2, 1/4, 1/8
    assert pdrop["visual_tokens_per_layer"] == [n, n // 2, n // 4, n // 8]
    for name, sched in results["schedule"].items():
        # the tokens hooks saw entering every LLM layer are the schedule the method reports
        assert results["flops"][name]["llm_attn_tokens"] == sched["sequence_per_layer"]
        assert sched["sequence_per_layer"] == [prompt - n + v for v in sched["visual_tokens_per_layer"]]


def test_flops_follow_the_schedule(results):
    flops, rows = results["flops"], {r["name"]: r for r in results["summary"]}
    assert flops["base"]["residual"] == 0 and flops["base"]["llm_residual"] == 0
    for name in (FASTV, PDROP):
        f = flops[name]
        assert f["counted"]["llm"] < flops["base"]["counted"]["llm"]
        for part in ("vision", "projector", "lm_head"):  # an in-LLM method leaves the rest of the prefill alone
            assert f["counted"][part] == flops["base"]["counted"][part]
        # what the schedule does not explain is the method's own scoring: positive, and small next to the LLM
        assert 0 < f["llm_residual"] < 0.05 * f["counted"]["llm"]
        assert rows[name]["ideal_speedup"] > 1.0
        # the decoder FLOPs stats() reports are the same per-layer formula on the same schedule
        assert results["schedule"][name]["prefill_flops"] == f["schedule_llm"]
    # PDrop's P2 probe projects the keys of every token at each of its cuts; FastV scores one row at one layer
    assert flops[PDROP]["llm_residual"] > flops[FASTV]["llm_residual"]


def test_overhead_ranges_are_found(results):
    profiles = results["profiles"]
    assert profiles["base"]["reduce_ms"] == 0
    # FastV: observe at layer K-1 and select at K; PDrop: one select (with its probe) per cut
    assert profiles[FASTV]["reduce_ranges_per_forward"] == 2 and profiles[PDROP]["reduce_ranges_per_forward"] == 3
    assert profiles[FASTV]["probe_ms"] == 0 and profiles[PDROP]["probe_ms"] > 0
    for name in (FASTV, PDROP):
        assert profiles[name]["reduce_ms"] > 0 and profiles[name]["slicing_ms"] > 0


def test_decode_generates_the_same_tokens_count_on_a_smaller_cache(bench, results):
    shape, prompt = bench.QUICK_INLLM, results["prompt_tokens"]
    kv_dim, itemsize = shape.kv_heads * shape.dim // shape.heads, 2  # bf16
    for name, decode in results["decode"].items():
        assert decode["output_length"] == prompt + NEW_TOKENS
        assert decode["steps"] == [NEW_TOKENS - 1] and decode["tokens_per_s"] > 0 and decode["wall_tokens_per_s"] > 0
        # the cache after the prefill holds each layer's own sequence: keys and values
        sched = results["schedule"][name]
        assert sched["kv_cache_bytes"] == sum(2 * s * kv_dim * itemsize for s in sched["sequence_per_layer"])
    rows = {r["name"]: r for r in results["summary"]}
    assert rows[FASTV]["kv_fraction"] == pytest.approx((2 * prompt + 2 * (prompt - shape.patches + shape.patches // 4)) / (4 * prompt))
    assert rows[PDROP]["kv_fraction"] < rows[FASTV]["kv_fraction"] < 1.0
