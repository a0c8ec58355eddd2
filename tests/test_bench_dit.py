"""`tokenreduce bench zoo:digits-dit`: caching methods against the uncached DiT, end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from tokenreduce import bench_dit, cli


def test_bench_dit_writes_json_table_and_grid(tmp_path, capsys):
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    code = cli.main([
        "bench", "zoo:digits-dit", "--method", "fora", "toca", "--samples", "4", "--steps", "10", "--repeats", "1",
        "--warmup", "0", "--out", str(out), "--grid", str(grid), "--no-progress",
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "TFLOPs/img" in table and "PSNR dB" in table
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["base", "fora", "toca"]
    base = rows[0]
    assert math.isinf(base["psnr"]) and base["ssim"] == pytest.approx(1.0) and base["ideal_speedup"] == 1.0
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert base["tflops"] < 0.01  # one sample, 10 steps of a doubled (CFG) batch of 1, not the whole batch
    assert all(r["tflops"] < base["tflops"] for r in rows[1:])
    assert all(r["cache_stats"]["partial_steps"] > 0 for r in rows[1:])
    assert rows[2]["config"]["num_steps"] == 10  # the schedule knows the step count of a bare transformer
    assert report["samples"] == 4 and report["skipped"] == []
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_configs_skip_what_a_method_cannot_take():
    skipped: list[str] = []
    configs = bench_dit.make_configs(["fora", "teacache", "delta_dit"], {"interval": 0}, 10, skipped)
    assert configs == []
    assert any(s.startswith("teacache: no setting interval") for s in skipped)
    assert any("interval=0" in s for s in skipped) and len(skipped) == 3


def test_settings_label_shows_only_changed_fields():
    config = bench_dit.make_configs(["toca"], {"interval": 4}, 50, [])[0].to_dict()
    assert bench_dit.settings_label(config) == "interval=4"
    assert bench_dit.settings_label(bench_dit.make_configs(["fora"], {}, 50, [])[0].to_dict()) == "defaults"


def test_one_impossible_method_is_an_error(capsys):
    assert cli.main(["bench", "zoo:digits-dit", "--method", "teacache", "--set", "interval=2", "--samples", "2"]) == 2
    assert "teacache: no setting interval" in capsys.readouterr().err


def test_no_cfg_with_fewer_steps_baseline_matched_to_flops(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main([
        "bench", "zoo:digits-dit", "--method", "fora", "--samples", "2", "--steps", "10", "--guidance", "1", "--fewer-steps",
        "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    report = json.loads(out.read_text())
    base, fora, fewer = report["rows"]
    assert report["guidance"] == 1.0 and fewer["method"] == bench_dit.FEWER_STEPS and fewer["config"] is None
    assert fewer["steps"] == round(10 * fora["tflops"] / base["tflops"]) < 10
    assert fewer["tflops"] == pytest.approx(base["tflops"] * fewer["steps"] / 10, rel=1e-9)  # uncached cost is linear in steps
    assert fewer["psnr"] < math.inf  # measured against the full-step uncached samples
    assert bench_dit.FEWER_STEPS in capsys.readouterr().out


def test_fewer_steps_must_be_fewer(capsys):
    assert cli.main(["bench", "zoo:digits-dit", "--method", "fora", "--samples", "2", "--steps", "10", "--fewer-steps", "10"]) == 2
    assert "fewer_steps=[10]" in capsys.readouterr().err
