"""The command line: `tokenreduce methods` and `tokenreduce bench` on a model saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import vit_fixtures as fx

import tokenreduce as tr
from tokenreduce import bench, cli

README = Path(__file__).parents[1] / "README.md"


def test_methods_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ["tome", "evit", "ficoco_v", "random", "uniform", "pooling"]:
        assert name in out


def test_readme_method_tables_are_generated_from_the_registry():
    assert cli.methods_table(markdown=True) in README.read_text(), "regenerate with `tokenreduce methods --markdown`"


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    fx.build("hf_vit_cls").save_pretrained(path)
    return path


def test_bench_from_pretrained_path_writes_json_and_plot(saved_vit, tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    code = cli.main([
        "bench", str(saved_vit), "--method", "tome", "pooling", "--keep", "16", "32", "--samples", "8",
        "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--out", str(out), "--plot", str(plot), "--no-progress",
    ])
    assert code == 0
    table = capsys.readouterr().out
    assert "meas/ideal" in table and "keep=16" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["base", "tome", "tome", "pooling", "pooling"]
    assert [r["tokens_out"] for r in rows] == [65, 17, 33, 17, 33]
    assert rows[0]["agreement"] == 1.0 and rows[0]["ideal_speedup"] == 1.0
    assert all(r["gflops"] < rows[0]["gflops"] for r in rows[1:])
    assert plot.stat().st_size > 1000


def test_bench_errors_are_one_clear_line(saved_vit, capsys):
    assert cli.main(["bench", str(saved_vit), "--method", "fastest", "--keep", "4"]) == 2
    assert "unknown method 'fastest'; available methods: tome" in capsys.readouterr().err
    assert cli.main(["bench", str(saved_vit), "--method", "tome", "--keep", "500", "--samples", "4"]) == 2
    assert "keep=500 is larger than the 64 reducible tokens" in capsys.readouterr().err


def test_viz_draws_every_supported_method(saved_vit, tmp_path, capsys):
    out = tmp_path / "viz.png"
    assert cli.main(["viz", str(saved_vit), "--method", "all", "--keep", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_surviving_patches_match_the_budget():
    model = fx.build("hf_vit_cls")
    with tr.apply(model, tr.UniformConfig(keep=16)) as handle:
        fx.output(model, fx.images(2))
        alive = handle.surviving_patches()
    assert alive.shape == (2, 64) and alive.sum(dim=1).tolist() == [16, 16]
    assert alive[0].view(8, 8)[::7, ::7].all()  # the corners of a regular sub-grid


def test_bench_on_the_zoo_vlm_reports_answer_accuracy_per_kind(tmp_path, capsys):
    out = tmp_path / "vlm.json"
    code = cli.main(["bench", "zoo:digits-vlm", "--method", "fastervlm", "--keep", "64", "--samples", "6", "--batch-size", "6",
                     "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens_out"] for r in rows] == [256, 64]
    assert set(rows[1]["accuracy_by_group"]) == {"position", "count", "compare"}
    assert rows[1]["gflops"] < rows[0]["gflops"]
    assert "compare %" in capsys.readouterr().out


def test_bench_compares_pre_and_in_llm_methods_at_equal_equivalent_tokens(tmp_path, capsys):
    out = tmp_path / "vlm.json"
    code = cli.main(["bench", "zoo:digits-vlm", "--method", "fastv", "random", "--equivalent-tokens", "112", "--set", "fastv.layer=1",
                     "--samples", "4", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["base"]["equivalent_tokens"] == 256
    assert rows["random"]["config"]["keep"] == rows["random"]["equivalent_tokens"] == 112  # pre-LLM: every layer sees its 112
    assert rows["fastv"]["config"]["layer"] == 1 and rows["random"]["config"]["layer"] is None  # "fastv.layer" is fastv's only
    assert rows["fastv"]["tokens_out"] == 64 and rows["fastv"]["equivalent_tokens"] == (256 + 3 * 64) / 4  # layer 0 sees all 256
    assert "T_eq" in capsys.readouterr().out


def test_sweep_skips_budgets_a_method_cannot_reach(saved_vit, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli.main(["bench", str(saved_vit), "--method", "tome", "random", "--keep", "2", "--samples", "4", "--batch-size", "4",
                     "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["base", "random"]
    assert "cannot remove 62 of 64 tokens over 4 layers" in data["skipped"][0]
    assert "skipped: ToMeConfig" in capsys.readouterr().out


def test_viz_on_the_zoo_vlm_runs_only_the_vision_path(tmp_path, capsys):
    out = tmp_path / "vlm.png"
    assert cli.main(["viz", "zoo:digits-vlm", "--method", "fastervlm", "divprune", "--keep", "64", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_viz_refuses_methods_that_act_after_the_patch_grid_is_gone(tmp_path, capsys):
    out = tmp_path / "vlm.png"
    for method in ("fastv", "ficoco_vl"):
        assert cli.main(["viz", "zoo:digits-vlm", "--method", method, "--keep", "16", "--out", str(out)]) == 2
        assert f"{method} reduce(s) inside the language model" in capsys.readouterr().err
    assert not out.exists()


def _result(model, *rows):
    keys = {"accuracy": None, "agreement": 1.0, "gflops": 1.0, "tokens_out": 256}
    return {"model": model, "rows": [{**keys, **row} for row in rows]}


def test_compare_puts_pre_and_in_llm_methods_at_one_equivalent_budget_in_one_column(tmp_path, capsys):
    pre = _result("zoo:m", {"method": "base", "config": None, "accuracy": 0.9},
                  {"method": "random", "config": {"keep": 64}, "accuracy": 0.8, "gflops": 0.5})
    inside = _result("zoo:m", {"method": "base", "config": None, "accuracy": 0.9},
                     {"method": "fastv", "config": {"keep": None, "equivalent_tokens": 64}, "accuracy": 0.7, "gflops": 0.6},
                     {"method": "fastv", "config": {"keep": None, "equivalent_tokens": 128}, "accuracy": 0.85, "gflops": 0.7})
    other = _result("zoo:m", {"method": "fastv", "config": {"equivalent_tokens": 64, "mode": "x"}, "agreement": 0.5},
                    {"method": "sparsevlm", "config": {"keep": None, "schedule": [100, 50, 20]}, "accuracy": 0.6},
                    {"method": "ficoco_vl", "config": {"vision": {"r": 42}, "language": {"r": None}}, "accuracy": 0.5})
    paths = []
    for name, data in (("pre", pre), ("inside", inside), ("other", other)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    assert cli.main(["compare", *map(str, paths)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| method | T_eq 128 | T_eq 64 | schedule (100, 50, 20) | default |",
        "|---|---|---|---|---|",
        "| base (256 tokens) | 90.0 (1.000) | 90.0 (1.000) | 90.0 (1.000) | 90.0 (1.000) |",
        "| random | - | 80.0 (0.500) | - | - |",
        "| fastv | 85.0 (0.700) | 70.0 (0.600) | - | - |",
        "| fastv (other) | - | 50.0 (1.000) | - | - |",  # no labels: agreement with the unreduced model
        "| sparsevlm | - | - | 60.0 (1.000) | - |",
        "| ficoco_vl | - | - | - | 50.0 (1.000) |",  # the last stage's budget names the column
    ]
    (tmp_path / "elsewhere.json").write_text(json.dumps(_result("zoo:n")))
    assert cli.main(["compare", str(paths[0]), str(tmp_path / "elsewhere.json")]) == 2
    assert "different models ['zoo:m', 'zoo:n']" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ({"fastvv.layer": 1}, r"--set names fastvv, which this run does not measure \(methods: fastv, ficoco_vl\)"),
    ({"ficoco_vl.visoin.keep": 160}, r"FiCoCoVLConfig takes its settings per stage \(vision, language\).*got visoin.keep"),
    ({"positions": "compact"}, r"FiCoCoVLConfig takes its settings per stage.*got positions"),
])
def test_set_keys_that_reach_no_config_are_refused(extra, message):
    """A misspelt method or stage in --set must not be silently dropped."""
    with pytest.raises(tr.ConfigError, match=message):
        bench.sweep_configs(["fastv", "ficoco_vl"], [], [], extra, [128])
