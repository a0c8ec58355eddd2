"""benchmarks/bench_cache_pixart.py --quick: the script runs end to end and its numbers are consistent."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cache_pixart.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_cache_pixart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_flops_speed_and_cache_memory(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "r.json"
    results = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    table = capsys.readouterr().out
    assert "wall/ideal" in table and "CPU/ideal" in table and "cache MiB" in table
    rows = results["rows"]
    assert list(rows) == ["base", "toca", "fora"]
    base, toca, fora = rows["base"], rows["toca"], rows["fora"]
    assert base["ideal_speedup"] == 1.0 and base["cache_bytes_peak"] == 0 and base["latent_rel_error"] == 0.0
    for row in (toca, fora):
        assert row["flops"] < base["flops"] and row["ideal_speedup"] > 1.0
        assert 0.0 < row["flops_ratio_analytic"] < 1.0 and row["partial_steps"] > 0
        assert math.isfinite(row["efficiency"]) and row["efficiency"] > 0.0 and row["cpu_efficiency"] > 0.0
        assert 0.0 < row["latent_rel_error"] < 1.0
    # FORA caches one [2B, N, C] output per unit (self-, cross-attention, MLP) of every block, in the model dtype (bf16).
    model = results["model"]
    assert fora["cache_bytes_peak"] == model["blocks"] * 3 * 2 * model["image_tokens"] * model["hidden"] * 2
    assert toca["cache_bytes_peak"] > fora["cache_bytes_peak"]  # plus staleness counters and cross-attention maps
    assert json.loads(out.read_text())["rows"]["toca"]["config"]["preset"] == "pixart"
