"""Benchmark: ToMe on a timm ViT, FLOPs vs measured speed, overhead and memory, in one process.

Model: ``timm.create_model(--model, pretrained=False)`` (random weights: speed does not
depend on them), eval mode, fp32, under ``torch.inference_mode()``, on a random input
batch of ``--batch`` images at the model's input size (224x224 for ViT-B/16). ToMe is
applied with ``tokenreduce.apply(copy.deepcopy(model), ToMeConfig(r=r))``: one separate
copy per ``r``, so that the unreduced model and every ``r`` can be timed interleaved.

What is measured, and how
-------------------------
1. FLOPs (2 x MACs, matrix products only) with ``tokenreduce.measure.count_flops``.
   The ``meta`` device is tried first (free; ToMe runs there since
   ``ops.merge.complement`` sorts instead of calling ``nonzero``); if any forward fails
   there, the printed reason says where, and every candidate is counted on CPU with
   batch 1 and scaled by ``--batch`` (exact: the token schedule and every op's FLOPs
   are per sample). FLOPs-ideal speed-up = base FLOPs / reduced FLOPs.
   Cross-check: the counted FLOPs of the blocks against
   ``sum_l attn(n_in_l) + mlp(n_out_l)`` built from
   ``transformer_block_flops`` and ``handle.stats()["tokens_per_layer"]``. The merge
   sits between attention and MLP, so block ``l``'s attention (QKV, SDPA, proj) runs
   on the ``n_in_l`` tokens entering the block and its MLP on the ``n_out_l`` tokens
   left after the merge. ToMe's own similarity matmul (``[|A|, d] @ [d, |B|]`` per
   sample) is counted by the counter too; it is reported as a separate term.
2. Throughput (images/s) with ``time_interleaved`` (round-robin, rotated order,
   ``--warmup`` + ``--repeats`` forwards per candidate); measured speed-up = ratio of
   medians; efficiency = measured / ideal. **Target: measured / ideal >= 0.9.**
   Per-block wall times are recorded with forward pre/post hooks during the same
   timed forwards (two ``perf_counter`` calls per block) and compared with what the
   per-block FLOPs predict.
3. Our overhead: ``--profile-forwards`` reduced forwards under
   ``torch.profiler.profile(activities=[CPU])``; the ``cpu_time_total`` (self +
   children) of the ``tokenreduce.reduce`` ranges (``merge_slot.OVERHEAD_LABEL``,
   scoring + merging) per forward, as % of the reduced and of the unreduced median
   forward time. The same profiles give an op-level breakdown (inside the range, and
   base vs reduced for the whole forward) and which SDPA kernel ran.
4. Peak memory: CPU RSS delta of one forward with ``tokenreduce.measure.peak_memory``
   (``--mem-repeats`` times per candidate, interleaved, ``malloc_trim`` before each;
   the largest delta is reported since allocator caching can only hide memory).

Run (from the repository root, in the project's venv)::

    python benchmarks/bench_tome_vit.py                      # ViT-B/16, batch 16, r = 8 16
    python benchmarks/bench_tome_vit.py --r 8 16 --repeats 10 --out results.json
    python benchmarks/bench_tome_vit.py --batch 2 --repeats 2 --warmup 1   # smoke test

On an idle 2-core CPU the default run takes about 4 minutes; much longer when other
processes compete for the cores (see the README for how to read such a run).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import statistics
import time
from typing import Any

import torch

import timm
import tokenreduce as tr
from tokenreduce.measure import (
    ModuleTimer, analyse_overhead, count_flops, parallel_op_probe, peak_memory, profile_calls, speedup,
    time_interleaved, transformer_block_flops,
)
from tokenreduce.merge_slot import OVERHEAD_LABEL

from common import log, report_contention, write_results

TARGET_EFFICIENCY = 0.9
BASE = "base"


def cand_name(r: int) -> str:
    return f"r={r}"


def malloc_trim() -> None:
    """Give glibc's cached free memory back to the OS so that RSS deltas are comparable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# --------------------------------------------------------------------------- model facts


def model_facts(model: torch.nn.Module) -> dict[str, int]:
    block = model.blocks[0]
    return {
        "dim": int(model.embed_dim),
        "mlp_dim": int(block.mlp.fc1.out_features),
        "head_dim": int(block.attn.head_dim),
        "num_heads": int(block.attn.num_heads),
        "num_layers": len(model.blocks),
    }


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return tuple(int(s) for s in size)  # type: ignore[return-value]


# --------------------------------------------------------------------------- FLOPs


def _block_flops(by_module: dict[str, int], num_layers: int) -> list[int]:
    prefix = next(k.rsplit(".blocks.", 1)[0] for k in by_module if ".blocks." in k)
    return [by_module.get(f"{prefix}.blocks.{i}", 0) for i in range(num_layers)]


def count_candidate(model: torch.nn.Module, r: int | None, x: torch.Tensor) -> dict[str, Any]:
    """FLOPs of one forward of ``model`` (a copy is made) with ToMe(r) or unreduced."""
    m = copy.deepcopy(model).to(x.device)
    handle = tr.apply(m, tr.ToMeConfig(r=r)) if r is not None else None
    try:
        report = count_flops(lambda: m(x))
        stats = handle.stats() if handle is not None else None
    finally:
        if handle is not None:
            handle.remove()
        del m
    return {"report": report, "stats": stats}


def measure_flops(model: torch.nn.Module, rs: list[int], batch: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Count on meta with the full batch; fall back to CPU batch 1 x batch if any candidate fails on meta."""
    num_layers = len(model.blocks)
    out: dict[str, Any] = {"device": "meta", "scale": 1, "fallback_reason": None}
    results: dict[str, dict[str, Any]] = {}
    try:
        x = torch.empty(batch, *shape, device="meta")
        results[BASE] = count_candidate(model, None, x)
        for r in rs:
            results[cand_name(r)] = count_candidate(model, r, x)
    except Exception as exc:  # noqa: BLE001  (report whatever the meta path raised)
        out["fallback_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        where = exc.__traceback__
        frames = []
        while where is not None:
            code = where.tb_frame.f_code
            if "tokenreduce" in code.co_filename:
                frames.append(f"{code.co_filename.split('src/')[-1]}:{where.tb_lineno} {code.co_name}")
            where = where.tb_next
        out["fallback_where"] = frames[-1] if frames else None
        base_meta = results.get(BASE)
        out.update(device="cpu", scale=batch)
        x = torch.randn(1, *shape)
        results = {BASE: count_candidate(model, None, x)}
        for r in rs:
            results[cand_name(r)] = count_candidate(model, r, x)
        if base_meta is not None:
            out["base_meta_full_batch"] = base_meta["report"].total
            out["base_cpu_batch1_scaled"] = results[BASE]["report"].total * batch
    scale = out["scale"]
    out["candidates"] = {}
    for name, res in results.items():
        rep = res["report"]
        out["candidates"][name] = {
            "total": rep.total * scale,
            "blocks": [f * scale for f in _block_flops(rep.by_module, num_layers)],
            "tokens_per_layer": res["stats"]["tokens_per_layer"] if res["stats"] else None,
            "tokens_in": res["stats"]["tokens_in"] if res["stats"] else None,
            "removed_per_layer": res["stats"]["removed_per_layer"] if res["stats"] else None,
        }
    return out


def analytic_blocks(tokens_in: int, tokens_per_layer: list[int], facts: dict[str, int], batch: int) -> dict[str, Any]:
    """Analytic block FLOPs for the merge-between-attention-and-MLP forward, per layer and summed."""
    d, m, hd = facts["dim"], facts["mlp_dim"], facts["head_dim"]
    n_in = [tokens_in] + tokens_per_layer[:-1]
    n_out = tokens_per_layer
    attn = [transformer_block_flops(n, d, m, mlp_matrices=0) for n in n_in]  # QKVO + attention on n_in
    mlp = [transformer_block_flops(n, d, m) - transformer_block_flops(n, d, m, mlp_matrices=0) for n in n_out]
    # ToMe scoring: per sample, [|A|, hd] @ [hd, |B|] with |A| = ceil(n/2), |B| = floor(n/2), only where it merged.
    scoring = [2 * ((a + 1) // 2) * (a // 2) * hd if a != b else 0 for a, b in zip(n_in, n_out)]
    per_layer = [batch * (x + y) for x, y in zip(attn, mlp)]
    return {
        "n_in": n_in,
        "n_out": n_out,
        "per_layer": per_layer,
        "model_blocks": sum(per_layer),
        "scoring": batch * sum(scoring),
        "scoring_per_layer": [batch * s for s in scoring],
        # what one would get by (wrongly) charging the whole block to one token count
        "if_all_n_in": batch * sum(transformer_block_flops(n, d, m) for n in n_in),
        "if_all_n_out": batch * sum(transformer_block_flops(n, d, m) for n in n_out),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--r", type=int, nargs="+", default=[8, 16])
    p.add_argument("--repeats", type=int, default=8, help="timed forwards per candidate")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per candidate before timing")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads (default: all cores)")
    p.add_argument("--profile-forwards", type=int, default=2, help="profiled forwards per candidate (overhead, op breakdown)")
    p.add_argument("--mem-repeats", type=int, default=2, help="peak-memory measurements per candidate")
    p.add_argument("--show-tables", action="store_true", help="also print torch.profiler's key_averages tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    log(f"creating {args.model} (random weights), threads={torch.get_num_threads()}")
    base = timm.create_model(args.model, pretrained=False).eval()
    facts = model_facts(base)
    shape = input_size(base)
    names = [BASE] + [cand_name(r) for r in args.r]
    results: dict[str, Any] = {
        "config": vars(args),
        "env": {
            "torch": torch.__version__, "timm": timm.__version__, "tokenreduce": tr.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus_available": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
        "model": {**facts, "input_size": shape},
    }

    probe_before = parallel_op_probe(args.threads)

    with torch.inference_mode():
        # ---------------------------------------------------------------- 1. FLOPs
        log("counting FLOPs")
        flops = measure_flops(base, args.r, args.batch, shape)
        base_flops = flops["candidates"][BASE]["total"]
        cross = {}
        for r in args.r:
            c = flops["candidates"][cand_name(r)]
            a = analytic_blocks(c["tokens_in"], c["tokens_per_layer"], facts, args.batch)
            counted_blocks = sum(c["blocks"])
            cross[cand_name(r)] = {
                **a,
                "counted_blocks": counted_blocks,
                "counted_total": c["total"],
                "non_block": c["total"] - counted_blocks,
                "ratio_counted_over_analytic": counted_blocks / (a["model_blocks"] + a["scoring"]),
                "ratio_counted_over_analytic_without_scoring": counted_blocks / a["model_blocks"],
            }
        n0 = flops["candidates"][cand_name(args.r[0])]["tokens_in"] if args.r else None
        if n0 is not None:
            base_blocks_analytic = args.batch * facts["num_layers"] * transformer_block_flops(n0, facts["dim"], facts["mlp_dim"])
            cross[BASE] = {
                "counted_blocks": sum(flops["candidates"][BASE]["blocks"]),
                "model_blocks": base_blocks_analytic,
                "ratio_counted_over_analytic": sum(flops["candidates"][BASE]["blocks"]) / base_blocks_analytic,
            }
        results["flops"] = flops
        results["cross_check"] = cross

        # ---------------------------------------------------------------- models
        x = torch.randn(args.batch, *shape)
        models: dict[str, torch.nn.Module] = {BASE: base}
        handles = {}
        for r in args.r:
            m = copy.deepcopy(base)
            handles[cand_name(r)] = tr.apply(m, tr.ToMeConfig(r=r))
            models[cand_name(r)] = m

        def forward_fn(model):
            return lambda: model(x)

        fns = {name: forward_fn(models[name]) for name in names}

        # ---------------------------------------------------------------- 2. throughput (+ per-block hooks)
        log(f"timing {names} interleaved: warmup={args.warmup}, repeats={args.repeats}")
        timers = {name: ModuleTimer({str(i): b for i, b in enumerate(models[name].blocks)}) for name in names}
        timings = time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        block_times, outside_blocks = {}, {}
        for name in names:
            timers[name].remove()
            timed = [list(f.values()) for f in timers[name].last(args.repeats)]
            block_times[name] = [statistics.median(f[i] for f in timed) for i in range(facts["num_layers"])]
            # same forwards, same order as timings[name].times
            outside_blocks[name] = statistics.median(t - sum(f) for t, f in zip(timings[name].times, timed))
        results["timing"] = {
            name: {"times_s": list(t.times), "median_s": t.median, "min_s": t.min, "mean_s": t.mean,
                   "images_per_s": args.batch / t.median}
            for name, t in timings.items()
        }
        results["block_times_s"] = block_times
        results["outside_blocks_s"] = outside_blocks

        # ---------------------------------------------------------------- 3. overhead + op breakdown (profiler)
        log(f"profiling {args.profile_forwards} forwards per candidate")
        profiles = {}
        for name in names:
            prof, wall = profile_calls(fns[name], args.profile_forwards)
            removed = handles[name].stats()["removed_per_layer"] if name in handles else None
            profiles[name] = {**analyse_overhead(prof, args.profile_forwards, removed), "wall_s_per_forward": wall / args.profile_forwards}
            del prof

        # ---------------------------------------------------------------- 4. peak memory
        log(f"peak memory, {args.mem_repeats} per candidate")
        mem: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(args.mem_repeats):
            for name in names:
                malloc_trim()
                mem[name].append(peak_memory(fns[name]).delta_bytes)
        results["memory_delta_bytes"] = mem

    results["env"]["parallel_op_probe"] = [probe_before, parallel_op_probe(args.threads)]
    results["env"]["loadavg_end"] = os.getloadavg()
    results["env"]["run_seconds"] = time.perf_counter() - t_start

    # -------------------------------------------------------------------- summary rows
    rows = []
    for name in names:
        c = flops["candidates"][name]
        ideal = base_flops / c["total"]
        measured = speedup(timings[BASE], timings[name])
        p = profiles[name]
        reduce_s = p["reduce_ms"] / 1e3
        rows.append({
            "name": name,
            "r": None if name == BASE else int(name.split("=")[1]),
            "tokens_out": c["tokens_per_layer"][-1] if c["tokens_per_layer"] else (flops["candidates"][names[1]]["tokens_in"] if len(names) > 1 else None),
            "gflops": c["total"] / 1e9,
            "ideal_speedup": ideal,
            "images_per_s": args.batch / timings[name].median,
            "measured_speedup": measured,
            "efficiency": measured / ideal,
            "measured_speedup_min": timings[BASE].min / timings[name].min,
            "efficiency_min": timings[BASE].min / timings[name].min / ideal,
            "meets_target": measured / ideal >= TARGET_EFFICIENCY if name != BASE else None,
            "overhead_ms_per_forward": p["reduce_ms"],
            "overhead_pct_of_reduced": 100 * reduce_s / timings[name].median,
            "overhead_pct_of_base": 100 * reduce_s / timings[BASE].median,
            "overhead_pct_of_profiled_forward": 100 * reduce_s / p["wall_s_per_forward"],
            "overhead_min_ms_per_forward": p["reduce_min_over_forwards_ms"] or 0.0,
            "overhead_min_pct_of_reduced": 100 * (p["reduce_min_over_forwards_ms"] or 0.0) / 1e3 / timings[name].median,
            "overhead_min_pct_of_base": 100 * (p["reduce_min_over_forwards_ms"] or 0.0) / 1e3 / timings[BASE].median,
            "peak_mb": max(mem[name]) / 2**20,
        })
    results["summary"] = rows
    results["profiles"] = {n: {k: v for k, v in p.items() if k != "table"} for n, p in profiles.items()}

    print_report(args, facts, flops, cross, rows, timings, block_times, profiles, results)
    write_results(args.out, results)
    return results


# --------------------------------------------------------------------------- printing


def print_report(args, facts, flops, cross, rows, timings, block_times, profiles, results) -> None:
    env = results["env"]
    print(f"\n=== ToMe on {args.model}: batch {args.batch}, {tuple(results['model']['input_size'])}, fp32, "
          f"inference_mode, {env['torch_threads']} threads, torch {env['torch']}, timm {env['timm']} ===")
    print(f"load average start/end: {env['loadavg_start'][0]:.2f} / {env['loadavg_end'][0]:.2f}; "
          f"run took {env['run_seconds']:.0f} s; timing: warmup {args.warmup}, repeats {args.repeats} (medians)")

    report_contention(env["parallel_op_probe"])

    # FLOPs method
    print("\n-- FLOPs counting")
    if flops["device"] == "meta":
        print(f"counted on the meta device with batch {args.batch}")
    else:
        print(f"meta device FAILED for a ToMe forward: {flops['fallback_reason']}")
        if flops.get("fallback_where"):
            print(f"  raised in {flops['fallback_where']}")
        print(f"-> all candidates counted on CPU with batch 1 and scaled x{args.batch}")
        if "base_meta_full_batch" in flops:
            a, b = flops["base_meta_full_batch"], flops["base_cpu_batch1_scaled"]
            print(f"  scaling check (unreduced): meta batch {args.batch} = {a / 1e9:.3f} GFLOPs, "
                  f"CPU batch 1 x {args.batch} = {b / 1e9:.3f} GFLOPs, ratio {a / b:.6f}")

    # main table
    print("\n-- Summary (speed-ups from medians; overhead = tokenreduce.reduce range, self+children)")
    hdr = (f"{'cand':>6} {'tok out':>7} {'GFLOPs':>8} {'ideal':>6} {'img/s':>6} {'meas.':>6} {'meas/ideal':>10} "
           f"{'ovh ms':>7} {'ovh%red':>7} {'ovh%base':>8} {'peak MB':>8}")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        flag = "" if row["meets_target"] is None else ("  ok" if row["meets_target"] else f"  < {TARGET_EFFICIENCY}")
        print(f"{row['name']:>6} {row['tokens_out']:>7} {row['gflops']:>8.1f} {row['ideal_speedup']:>6.3f} "
              f"{row['images_per_s']:>6.2f} {row['measured_speedup']:>6.3f} {row['efficiency']:>10.3f} "
              f"{row['overhead_ms_per_forward']:>7.1f} {row['overhead_pct_of_reduced']:>6.2f}% {row['overhead_pct_of_base']:>7.2f}% "
              f"{row['peak_mb']:>8.1f}{flag}")
    print(f"target: measured/ideal >= {TARGET_EFFICIENCY}")
    if args.profile_forwards > 1:
        print("overhead, per op the fastest of the profiled forwards (filters random preemptions, not systematic waits): " + "; ".join(
            f"{row['name']}: {row['overhead_min_ms_per_forward']:.1f} ms = {row['overhead_min_pct_of_reduced']:.2f}% of reduced, "
            f"{row['overhead_min_pct_of_base']:.2f}% of base" for row in rows if row["name"] != BASE))
    print("from minimum times instead (optimistic, the least-disturbed call): " + "; ".join(
        f"{row['name']}: speed-up {row['measured_speedup_min']:.3f}, measured/ideal {row['efficiency_min']:.3f}"
        for row in rows if row["name"] != BASE))
    for name, t in timings.items():
        ts = ", ".join(f"{v:.2f}" for v in t.times)
        print(f"  {name:>6} forward s: median {t.median:.3f}, min {t.min:.3f}, mean {t.mean:.3f}  [{ts}]")
    print("  peak-memory deltas (MB) per repeat: " + "; ".join(
        f"{n}: " + ", ".join(f"{b / 2**20:.0f}" for b in v) for n, v in results["memory_delta_bytes"].items()))

    # cross-check
    print("\n-- FLOPs cross-check: counted blocks vs sum_l [attn(n_in_l) + mlp(n_out_l)] (transformer_block_flops)")
    if BASE in cross:
        c = cross[BASE]
        print(f"  {'base':>6}: counted blocks {c['counted_blocks'] / 1e9:.4f} G, analytic {c['model_blocks'] / 1e9:.4f} G, "
              f"ratio {c['ratio_counted_over_analytic']:.6f}")
    for r in args.r:
        c = cross[cand_name(r)]
        print(f"  {cand_name(r):>6}: counted blocks {c['counted_blocks'] / 1e9:.4f} G; analytic model {c['model_blocks'] / 1e9:.4f} G "
              f"+ ToMe scoring matmul {c['scoring'] / 1e9:.4f} G = {(c['model_blocks'] + c['scoring']) / 1e9:.4f} G; "
              f"ratio {c['ratio_counted_over_analytic']:.6f} (without scoring term {c['ratio_counted_over_analytic_without_scoring']:.6f})")
        print(f"          non-block (patch embed + head) {c['non_block'] / 1e9:.4f} G; for contrast, whole block on n_in: "
              f"{c['if_all_n_in'] / 1e9:.4f} G, on n_out: {c['if_all_n_out'] / 1e9:.4f} G")
        print(f"          n_in  {c['n_in']}")
        print(f"          n_out {c['n_out']}")

    # per-block timing
    print("\n-- Per-block wall time (median over timed forwards, ms), vs the FLOPs prediction base_ms * flops_l / base_flops_l")
    base_bt = block_times[BASE]
    base_bf = flops["candidates"][BASE]["blocks"]
    for r in args.r:
        name = cand_name(r)
        bt, bf = block_times[name], flops["candidates"][name]["blocks"]
        ovh = profiles[name]["reduce_per_layer_ms"] or [0.0] * len(bt)
        print(f"  {name}: {'blk':>3} {'n_in':>4} {'n_out':>5} {'base':>7} {'reduced':>8} {'predicted':>9} {'excess':>7} {'reduce*':>8} {'flop ratio':>10} {'time ratio':>10}")
        c = cross[name]
        for i in range(len(bt)):
            pred = base_bt[i] * bf[i] / base_bf[i]
            print(f"         {i:>3} {c['n_in'][i]:>4} {c['n_out'][i]:>5} {1e3 * base_bt[i]:>7.1f} {1e3 * bt[i]:>8.1f} {1e3 * pred:>9.1f} "
                  f"{1e3 * (bt[i] - pred):>7.1f} {ovh[i]:>8.2f} {bf[i] / base_bf[i]:>10.3f} {bt[i] / base_bt[i]:>10.3f}")
        tot_pred = sum(base_bt[i] * bf[i] / base_bf[i] for i in range(len(bt)))
        print(f"         sum: base {1e3 * sum(base_bt):.0f}, reduced {1e3 * sum(bt):.0f}, predicted {1e3 * tot_pred:.0f}, "
              f"excess {1e3 * (sum(bt) - tot_pred):.0f} ms, of which reduce* {sum(ovh):.0f} ms "
              f"(* from the profiled forwards)")
        print(f"         outside the blocks (patch embed, final norm, head; median over forwards): "
              f"base {1e3 * results['outside_blocks_s'][BASE]:.0f} ms, reduced {1e3 * results['outside_blocks_s'][name]:.0f} ms")

    # ops
    print("\n-- Profiler: ops inside 'tokenreduce.reduce' (self CPU ms per forward)")
    for r in args.r:
        p = profiles[cand_name(r)]
        items = sorted(p["inside_ms"].items(), key=lambda kv: -kv[1])
        total = p["reduce_ms"]
        print(f"  {cand_name(r)}: range total {total:.1f} ms/forward over {p['reduce_ranges_per_forward']:.0f} ranges; "
              f"range self (python glue) {p['reduce_self_ms']:.1f} ms")
        for k, v in items[:14]:
            print(f"      {k:<40} {v:>8.2f} ms  ({100 * v / total if total else 0:5.1f}%)  calls/fwd {p['inside_calls_per_forward'][k]:.0f}")

    print("\n-- Profiler: whole forward, self CPU ms per forward, top ops (base vs reduced); FLOPs-ideal ratio in header")
    keys = sorted(profiles[BASE]["self_ms"], key=lambda k: -profiles[BASE]["self_ms"][k])
    extra = set()
    for r in args.r:
        extra |= {k for k, v in profiles[cand_name(r)]["self_ms"].items() if v > 2.0}
    keys = [k for k in keys if profiles[BASE]["self_ms"][k] > 2.0 or k in extra]
    keys += [k for k in extra if k not in keys]
    head = f"  {'op':<46} {'base':>8}" + "".join(f" {cand_name(r):>8} {'ratio':>6}" for r in args.r)
    print(head)
    print("  " + " " * 46 + f" {'':>8}" + "".join(f" {'':>8} {1 / next(x['ideal_speedup'] for x in rows if x['name'] == cand_name(r)):>6.3f}" for r in args.r))
    for k in keys:
        if k == OVERHEAD_LABEL:
            continue
        b = profiles[BASE]["self_ms"].get(k, 0.0)
        line = f"  {k[:46]:<46} {b:>8.1f}"
        for r in args.r:
            v = profiles[cand_name(r)]["self_ms"].get(k, 0.0)
            line += f" {v:>8.1f} {(v / b if b else float('inf')):>6.2f}"
        print(line)
    print("  SDPA ops per forward: " + "; ".join(f"{n}: {p['sdpa_calls_per_forward']}" for n, p in profiles.items()))
    print("  profiled forward wall s: " + ", ".join(f"{n} {p['wall_s_per_forward']:.2f}" for n, p in profiles.items()))
    if args.show_tables:
        for n, p in profiles.items():
            print(f"\n{n} key_averages (sorted by self_cpu_time_total, totals over {args.profile_forwards} forwards)")
            print(p["table"])


if __name__ == "__main__":
    main()
