"""Benchmark: in-LLM visual-token reduction (FastV, PyramidDrop) on a LLaVA-1.5-shaped VLM: prefill and decode.

Model, input and prefill are ``bench_vlm_prefill``'s (imported from it, not copied):
``LlavaForConditionalGeneration`` with random weights, bf16, CPU, batch 1, a CLIP
ViT-L/14-336 vision tower, LLaVA's projector and a Qwen2-0.5B-shaped LLM (24 layers,
hidden 896, 14 / 2 heads, SwiGLU 4864) on SDPA, as in-LLM reduction requires; one
prompt of ``--text-tokens`` text tokens around 576 image placeholders; one prefill is
``model(input_ids, attention_mask, pixel_values, logits_to_keep=1)``.

Candidates: the unreduced model and, per ``--methods`` spec, ``tokenreduce.apply``
on a weight-sharing copy. A spec is a registered method name with optional config
fields, ``name:field=value,field=value`` (values are Python literals, e.g.
``pdrop:layers=(6,12,18),lam=0.5``); the defaults are the issue's FastV K=2 R=0.75
(``fastv:layer=2,ratio=0.75``) and PyramidDrop's default (``pdrop``: cuts at the
decoder's quarter points 6 / 12 / 18, lambda 0.5). Unlike the vision-side methods,
these cut inside the LLM: the vision tower and projector run in full, and the
layers from each cut on run on fewer tokens.

What is measured, and how
-------------------------
1. FLOPs of one prefill, counted (``count_flops``) per component: vision tower,
   projector, LLM, LM head. The LLM is counted as it ran, i.e. each layer on its own
   sequence length. Two cross-checks: ``bench_vlm_prefill``'s per-layer formula on
   the tokens hooks saw entering every attention and MLP, and the library's own
   decoder FLOPs model (``decoder_shape(config).prefill_flops``) fed with the
   schedule the method reports (``stats()["sequence_per_layer"]``; the result must
   equal what ``stats()["prefill_flops"]`` reports, checked by the test); the
   LLM residual against the schedule is the method's own matrix products (FastV's
   last-row scores, PyramidDrop's probe P2: the cut layer's k projection of every
   token and q of the last one). FLOPs-ideal speed-up = base / reduced FLOPs.
2. Prefill latency, interleaved (``time_interleaved``, ``--warmup`` + ``--repeats``
   per candidate): median and min; measured speed-up = ratio of medians; efficiency =
   measured / FLOPs-ideal, **target >= 0.85**. ``ModuleTimer`` splits each prefill
   into vision / projector / LLM / LM head / rest, which gives the LLM's own
   speed-up against its own FLOPs ratio, and the component-weighted ideal (each
   component at its unreduced FLOP rate; see ``bench_vlm_prefill``).
3. Overhead: ``--profile-forwards`` prefills per candidate under ``torch.profiler``.
   The decoder machinery runs the method's scoring (``observe_attention``, inside the
   SDPA call of the scored layer) and its selection (``select``, including probe P2)
   in ``tokenreduce.reduce`` ranges (``merge_slot.OVERHEAD_LABEL``). For the profiled
   calls only, this script also wraps the P2 probe (``bench.row_probe``) and the
   whole cut (``bench.cut``: selection + gathering hidden states, positions, ids,
   rebuilding the causal mask); "slicing" is the cut minus its selection range. The
   overhead is scoring + selection + slicing, as % of the unreduced median prefill,
   **target <= 3 %**.
4. Decode: ``generate()``, greedy, ``--new-tokens`` tokens with ``min_new_tokens``
   equal to it (random weights would otherwise stop at whatever token is EOS),
   ``use_cache=True``, interleaved like the prefills (``--decode-repeats``). Hooks
   on the top model time every forward call that ``generate`` makes; the one on the
   whole prompt is the prefill, every call on one new token is a decode step.
   Decode tokens/s = decode steps / their summed forward time (the model's work on
   the cache the prefill left); the *wall* figure, decode steps / (end of
   ``generate`` - end of its prefill call), adds ``generate``'s own per-step work
   (logits processing, stopping criteria, cache bookkeeping). It is not generate's
   wall time minus the prefill call: transformers 5 runs the vision tower in
   ``generate``'s preparation (``_prepare_multimodal_encoder_kwargs_for_generation``),
   before and outside the model call on the prompt. A reduced cache makes each step's
   attention shorter, but a step on a 0.5 B model at batch 1 is dominated by
   reading the weights, so expect a small gain. Also reported: the KV-cache bytes
   after the prefill (``stats()["kv_cache_bytes"]``; for the unreduced model from the
   same per-layer formula, which the test checks against the stats) and the
   equivalent tokens (visual tokens averaged over the layers).

Run (from the repository root, in the project's venv)::

    python benchmarks/bench_inllm.py                          # FastV + PDrop: ~3-4 min on an idle 2-core CPU
    python benchmarks/bench_inllm.py --threads 1 --repeats 10 --out inllm.json
    python benchmarks/bench_inllm.py --methods fastv:layer=3,ratio=0.5 pdrop:lam=0.6
    python benchmarks/bench_inllm.py --quick                  # tiny shapes, smoke test, seconds

``--quick`` is ``bench_vlm_prefill``'s tiny model with a 4-layer LLM (PyramidDrop's
four stages need four layers); its numbers mean nothing. The figures of a run depend
on the machine's load: read the parallel-op probe line (``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.adapters import decoder as decoder_adapter
from tokenreduce.adapters.decoder import decoder_shape
from tokenreduce.config import ReductionConfig
from tokenreduce.measure import Timing, analyse_overhead, profile_calls, time_interleaved
from tokenreduce.merge_slot import OVERHEAD_LABEL

from bench_vlm_prefill import (
    BASE, FULL, QUICK, Shape, apply_candidates, count_candidates, finish_run, gf, prefill_calls, print_run, run_record,
    speed_columns, start_run, time_components, timing_record,
)
from common import format_table, log, write_results

TARGET_EFFICIENCY = 0.85
TARGET_OVERHEAD_PCT = 3.0
DEFAULT_METHODS = ["fastv:layer=2,ratio=0.75", "pdrop"]
QUICK_INLLM = dataclasses.replace(QUICK, layers=4)
CUT_LABEL = "bench.cut"
PROBE_LABEL = "bench.row_probe"


# --------------------------------------------------------------------------- candidates


def parse_spec(spec: str) -> ReductionConfig:
    """``name[:field=value,...]`` -> the method's config; values are Python literals (a tuple may hold commas)."""
    name, _, fields = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for key, value in re.findall(r"(\w+)=(\([^)]*\)|[^,]+)", fields):
        kwargs[key] = ast.literal_eval(value)
    return registry.config_class(name)(**kwargs)


def kv_bytes(sequence_per_layer: list[int], shape: Shape, itemsize: int) -> int:
    """Bytes of a batch-1 KV cache holding ``sequence_per_layer[l]`` tokens at layer ``l`` (keys + values, GQA width)."""
    kv_dim = shape.kv_heads * shape.dim // shape.heads
    return sum(2 * n * kv_dim * itemsize for n in sequence_per_layer)


# --------------------------------------------------------------------------- overhead instrumentation


@contextmanager
def instrumented() -> Iterator[bool]:
    """Profiler ranges around the decoder's whole cut and its P2 probe, for the profiled calls only; yields whether both were found.

    Both are private (``DecoderRun._cut``, the module function ``_row_probe``, looked up
    at call time by the cut's probe closure). This is benchmark-only instrumentation:
    if the adapter changes, the slicing and probe columns read "n/a" instead of failing.
    """
    run_cls = getattr(decoder_adapter, "DecoderRun", None)
    cut, probe = getattr(run_cls, "_cut", None), getattr(decoder_adapter, "_row_probe", None)
    if cut is None or probe is None:
        yield False
        return

    def ranged(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return wrapper

    run_cls._cut, decoder_adapter._row_probe = ranged(CUT_LABEL, cut), ranged(PROBE_LABEL, probe)
    try:
        yield True
    finally:
        run_cls._cut, decoder_adapter._row_probe = cut, probe


def range_ms(prof: Any, label: str, calls: int, within: str | None = None) -> float:
    """Per-call ms of the ``label`` ranges (self + children), only those nested in a ``within`` range if given."""
    total = 0.0
    for event in prof.events():
        if event.name != label:
            continue
        parent = event.cpu_parent
        while within is not None and parent is not None and parent.name != within:
            parent = parent.cpu_parent
        if within is None or parent is not None:
            total += event.cpu_time_total / 1e3
    return total / calls


def profile_overhead(fn: Callable[[], Any], calls: int) -> dict[str, Any]:
    """Scoring / selection (``tokenreduce.reduce``), P2 probe and slicing ms per prefill, from ``calls`` profiled prefills.

    Every prefill runs the same sequence of ranges (one per scored layer, one per
    cut), so their count per prefill gives ``analyse_overhead`` the slots for its
    per-slot fastest-of-the-calls estimate without asking the method for its schedule.
    """
    with instrumented() as found:
        prof, wall = profile_calls(fn, calls)
    ranges = sum(1 for event in prof.events() if event.name == OVERHEAD_LABEL) // calls
    overhead = analyse_overhead(prof, calls, [1] * ranges or None)
    result: dict[str, Any] = {key: overhead[key] for key in ("reduce_ms", "reduce_ranges_per_forward", "reduce_min_over_forwards_ms",
                                                              "inside_ms", "self_ms")}
    result["wall_s_per_forward"] = wall / calls
    result["probe_ms"] = range_ms(prof, PROBE_LABEL, calls) if found else None
    result["slicing_ms"] = range_ms(prof, CUT_LABEL, calls) - range_ms(prof, OVERHEAD_LABEL, calls, within=CUT_LABEL) if found else None
    result["total_ms"] = result["reduce_ms"] + (result["slicing_ms"] or 0.0)
    return result


# --------------------------------------------------------------------------- decode


class StepTimer:
    """Wall time of every call of the top model, split into prefill calls (whole prompt) and decode steps (one token).

    ``generate`` calls the model once per new token; the first call sees the prompt,
    every later one the single token just generated, on the growing cache.
    ``prefill_end`` is the clock when each prefill call returned: decode starts there.
    """

    def __init__(self, model: nn.Module) -> None:
        self.prefill: list[float] = []
        self.prefill_end: list[float] = []
        self.steps: list[list[float]] = []
        self._start = 0.0
        self._length = 0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True), model.register_forward_hook(self._post)]

    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._length = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        self._start = time.perf_counter()

    def _post(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        end = time.perf_counter()
        elapsed = end - self._start
        if self._length > 1:
            self.prefill.append(elapsed)
            self.prefill_end.append(end)
            self.steps.append([])
        else:
            self.steps[-1].append(elapsed)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def decode_figures(timer: StepTimer, timing: Timing, ends: list[float], repeats: int) -> dict[str, Any]:
    """Per-generate decode figures over the timed (last ``repeats``) generations; ``ends``: the clock when each generate returned."""
    prefill, steps = timer.prefill[-repeats:], timer.steps[-repeats:]
    model_rate = [len(s) / sum(s) for s in steps]
    wall_rate = [len(s) / (end - start) for s, end, start in zip(steps, ends[-repeats:], timer.prefill_end[-repeats:])]
    return {
        "steps": [len(s) for s in steps],
        "tokens_per_s": statistics.median(model_rate),
        "wall_tokens_per_s": statistics.median(wall_rate),
        "ms_per_step": 1e3 * statistics.median(statistics.median(s) for s in steps),
        "llm_prefill_in_generate_ms": 1e3 * statistics.median(prefill),
        "generate_s": list(timing.times),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"method specs name[:field=value,...] (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--repeats", type=int, default=None, help="timed prefills per candidate (default 6; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills and generations per candidate (after the counted prefill)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads (default: all cores)")
    p.add_argument("--profile-forwards", type=int, default=2, help="profiled prefills per candidate (overhead)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each generate() produces (min_new_tokens = max_new_tokens)")
    p.add_argument("--decode-repeats", type=int, default=None, help="timed generations per candidate (default 3; 1 with --quick)")
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens in the prompt (BOS included)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the whole pipeline in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--json", dest="out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 6)
    args.decode_repeats = args.decode_repeats or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = QUICK_INLLM if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    run = start_run(args, shape, dtype)
    inputs, prompt = run.inputs, run.prompt_tokens
    log(f"{run.params['total'] / 1e6:.1f} M parameters; prompt of {prompt} tokens ({shape.patches} image); threads={torch.get_num_threads()}")

    models, handles, skipped = apply_candidates(run.model, [(spec, functools.partial(parse_spec, spec)) for spec in args.methods])
    lengths: dict[str, int] = {}
    ends: dict[str, list[float]] = {name: [] for name in models}

    def generate(name: str) -> Callable[[], None]:
        def call() -> None:
            out = models[name].generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                        use_cache=True)
            ends[name].append(time.perf_counter())
            lengths[name] = int(out.shape[1])

        return call

    fns = prefill_calls(models, inputs)
    with torch.inference_mode():
        # ------------------------------------------------------------ 1. FLOPs and the schedule (the counted prefill is the first warm-up)
        flops = count_candidates(shape, models, fns, handles, skipped)
        names = list(models)
        schedule: dict[str, dict[str, Any]] = {}
        # the library's decoder FLOPs model (the one stats() and tflops budgets use), fed the schedule each method reports
        decoder = decoder_shape(run.model.config.get_text_config())
        for name in names:  # each method's own stats, unchanged by the other candidates' prefills
            schedule[name] = candidate_schedule(handles.get(name), shape, prompt, dtype)
            flops[name]["schedule_llm"] = decoder.prefill_flops(schedule[name]["sequence_per_layer"])
            flops[name]["llm_residual"] = flops[name]["counted"]["llm"] - flops[name]["schedule_llm"]

        # ------------------------------------------------------------ 2. prefill latency, interleaved, with component timers
        log(f"timing prefills of {names} interleaved: warmup={args.warmup}, repeats={args.repeats}")
        timings, parts = time_components(models, fns, args.warmup, args.repeats)

        # ------------------------------------------------------------ 3. overhead (profiler)
        log(f"profiling {args.profile_forwards} prefills per candidate")
        profiles = {name: profile_overhead(fns[name], args.profile_forwards) for name in names}

        # ------------------------------------------------------------ 4. decode: generate(), interleaved, per-call timers
        log(f"timing generate() of {args.new_tokens} tokens: warmup={args.warmup}, repeats={args.decode_repeats}")
        step_timers = {name: StepTimer(models[name]) for name in names}
        generations = time_interleaved({name: generate(name) for name in names}, warmup=args.warmup, repeats=args.decode_repeats)
        decode = {name: {**decode_figures(step_timers[name], generations[name], ends[name], args.decode_repeats), "output_length": lengths[name]}
                  for name in names}
        for timer in step_timers.values():
            timer.remove()

    finish_run(run, args.threads, handles)

    rows = summary_rows(names, flops, timings, profiles, parts, schedule, decode)
    results = {**run_record(args, shape, run, skipped), "flops": flops, "schedule": schedule, "summary": rows, "decode": decode,
               "timing": timing_record(timings), "components_s": parts, "profiles": profiles}
    print_report(args, shape, results)
    write_results(args.out, results)
    return results


def candidate_schedule(handle: tr.Handle | None, shape: Shape, prompt: int, dtype: torch.dtype) -> dict[str, Any]:
    """Tokens per layer, equivalent tokens, KV bytes after the prefill and the decoder FLOPs the method's stats report.

    For the base, the full prompt at every layer; it has no stats, hence no reported FLOPs.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if handle is None:
        sequence = [prompt] * shape.layers
        return {"visual_tokens_per_layer": [shape.patches] * shape.layers, "sequence_per_layer": sequence,
                "equivalent_tokens": float(shape.patches), "kv_cache_bytes": kv_bytes(sequence, shape, itemsize),
                "prefill_flops": None}
    stats = handle.stats()
    return {key: stats[key] for key in ("visual_tokens_per_layer", "sequence_per_layer", "equivalent_tokens", "kv_cache_bytes",
                                        "prefill_flops")}


def summary_rows(names: list[str], flops: dict[str, Any], timings: dict[str, Timing], profiles: dict[str, Any],
                 parts: dict[str, dict[str, float]], schedule: dict[str, Any], decode: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate: prefill FLOPs and speed-ups, the LLM's own speed-up against its FLOPs ratio, overhead, decode.

    The LLM columns isolate what an in-LLM method can change: the vision tower runs in
    full for every candidate, so the whole-prefill ideal is bounded by its share.
    """
    base_t = timings[BASE]
    base_kv, base_rate = schedule[BASE]["kv_cache_bytes"], decode[BASE]["tokens_per_s"]
    rows = []
    for name in names:
        speed = speed_columns(name, flops, timings, parts)
        p = profiles[name]
        overhead_pct = 100 * p["total_ms"] / 1e3 / base_t.median
        rows.append({
            "name": name, "equivalent_tokens": schedule[name]["equivalent_tokens"], "gflops": flops[name]["total"] / 1e9,
            "gflops_llm": flops[name]["counted"]["llm"] / 1e9, **speed,
            "llm_ideal_speedup": flops[BASE]["counted"]["llm"] / flops[name]["counted"]["llm"],
            "llm_measured_speedup": parts[BASE]["llm"] / parts[name]["llm"],
            "scoring_ms": p["reduce_ms"], "probe_ms": p["probe_ms"], "slicing_ms": p["slicing_ms"],
            "overhead_ms": p["total_ms"], "overhead_pct_of_base": overhead_pct,
            "kv_cache_bytes": schedule[name]["kv_cache_bytes"], "kv_fraction": schedule[name]["kv_cache_bytes"] / base_kv,
            "decode_tokens_per_s": decode[name]["tokens_per_s"], "decode_wall_tokens_per_s": decode[name]["wall_tokens_per_s"],
            "decode_speedup": decode[name]["tokens_per_s"] / base_rate,
            "meets_efficiency": None if name == BASE else speed["efficiency"] >= TARGET_EFFICIENCY,
            "meets_overhead": None if name == BASE else overhead_pct <= TARGET_OVERHEAD_PCT,
        })
    return rows


# --------------------------------------------------------------------------- printing


def print_report(args: argparse.Namespace, shape: Shape, results: dict[str, Any]) -> None:
    env, params, rows, flops = results["env"], results["parameters"], results["summary"], results["flops"]
    print(f"\n=== In-LLM reduction on a LLaVA-1.5-shaped VLM{' (--quick: tiny shapes, numbers meaningless)' if args.quick else ''}: "
          f"{args.dtype}, CPU, batch 1, {results['prompt_tokens']} prompt tokens ({shape.patches} image + {args.text_tokens} text), "
          f"{env['torch_threads']} threads ===")
    print(f"vision: CLIP {shape.vision_layers} x {shape.vision_dim}, {params['vision'] / 1e6:.1f} M params; LLM: Qwen2 {shape.layers} "
          f"layers x {shape.dim} (SwiGLU {shape.mlp}, {shape.heads} heads / {shape.kv_heads} KV), {params['llm'] / 1e6:.1f} M params; "
          f"total {params['total'] / 1e6:.1f} M")
    print_run(args, results, f", decode repeats {args.decode_repeats} x {args.new_tokens} tokens")

    print(f"\n-- Prefill (FLOPs = 2 x MACs, counted; speed-ups from medians; overhead = scoring + selection ('{OVERHEAD_LABEL}' "
          "ranges, P2 probe included) + slicing, as % of the unreduced median prefill)")
    head = ["candidate", "eq. vis tok", "GFLOPs", "LLM", "ideal x", "median ms", "min ms", "meas. x", "meas/ideal", "comp. ideal x",
            "LLM ideal x", "LLM meas. x", "score ms", "probe ms", "slice ms", "ovh %", "targets"]
    table = []
    for r in rows:
        flags = "" if r["meets_efficiency"] is None else (
            ("PASS" if r["meets_efficiency"] else "FAIL") + f" eff>={TARGET_EFFICIENCY}, "
            + ("PASS" if r["meets_overhead"] else "FAIL") + f" ovh<={TARGET_OVERHEAD_PCT:g}%")
        table.append([r["name"], f"{r['equivalent_tokens']:.1f}", gf(r["gflops"]), gf(r["gflops_llm"]), f"{r['ideal_speedup']:.3f}",
                      f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}", f"{r['measured_speedup']:.3f}", f"{r['efficiency']:.3f}",
                      f"{r['component_ideal_speedup']:.3f}", f"{r['llm_ideal_speedup']:.3f}", f"{r['llm_measured_speedup']:.3f}",
                      f"{r['scoring_ms']:.2f}", optional_ms(r["probe_ms"]), optional_ms(r["slicing_ms"]), f"{r['overhead_pct_of_base']:.2f}",
                      flags])
    print(format_table(head, table))
    print(f"targets: measured/ideal >= {TARGET_EFFICIENCY}, overhead <= {TARGET_OVERHEAD_PCT:g}% of the unreduced prefill; "
          "comp. ideal = the speed-up if every component kept its unreduced FLOP rate (the vision tower does not shrink)")
    for name, t in results["timing"].items():
        print(f"  {name:>24} prefill s: " + ", ".join(f"{v:.3f}" for v in t["times_s"]))

    print("\n-- FLOPs cross-check (GFLOPs): counted vs the per-layer formula on the tokens hooks saw (all components), and the "
          "LLM vs the formula on the method's reported schedule")
    head = ["candidate", "counted", "hook formula", "residual", "LLM counted", "LLM schedule", "LLM residual", "LLM seq per layer"]
    table = []
    for name, f in flops.items():
        seq = results["schedule"][name]["sequence_per_layer"]
        table.append([name, f"{f['total'] / 1e9:.3f}", f"{sum(f['analytic'].values()) / 1e9:.3f}", f"{f['residual'] / 1e9:+.4f}",
                      f"{f['counted']['llm'] / 1e9:.3f}", f"{f['schedule_llm'] / 1e9:.3f}", f"{f['llm_residual'] / 1e9:+.4f}",
                      compact(seq)])
    print(format_table(head, table))
    print("  residual = the method's own matrix products (last-row scores; PDrop's P2 probe: k projection of every token at each cut)")

    print(f"\n-- Decode: generate() of {args.new_tokens} tokens (greedy, fixed length), decode steps only; KV cache after the prefill")
    head = ["candidate", "output len", "tok/s (model)", "ms/step", "x vs base", "tok/s (wall)", "KV MiB", "KV / base"]
    table = [[r["name"], str(results["decode"][r["name"]]["output_length"]), f"{r['decode_tokens_per_s']:.2f}",
              f"{results['decode'][r['name']]['ms_per_step']:.1f}", f"{r['decode_speedup']:.3f}", f"{r['decode_wall_tokens_per_s']:.2f}",
              f"{r['kv_cache_bytes'] / 2**20:.2f}", f"{r['kv_fraction']:.3f}"] for r in rows]
    print(format_table(head, table))
    print("  tok/s (model) = decode steps / their forward time; (wall) = decode steps / (end of generate - end of its prefill call)")


def optional_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def compact(values: list[int]) -> str:
    """A per-layer list as runs, ``616x2 184x22``: 24 numbers do not fit a table cell."""
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return " ".join(f"{v}x{n}" for v, n in runs)


if __name__ == "__main__":
    main()
