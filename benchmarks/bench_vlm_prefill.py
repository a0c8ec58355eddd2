"""Benchmark: visual-token reduction on a LLaVA-1.5-shaped VLM, prefill FLOPs vs measured prefill latency, in one process.

Model: ``transformers.LlavaForConditionalGeneration`` built from a config with random
weights (speed does not depend on them; nothing is downloaded), in bf16 on CPU, eval
mode, under ``torch.inference_mode()``:

* vision tower: CLIP ViT-L/14-336 (24 layers, hidden 1024, 16 heads, MLP 4096,
  quick-GELU; 336 px, patch 14 -> 576 patches + [CLS]), ``vision_feature_layer=-2``,
  ``vision_feature_select_strategy="default"`` (drop [CLS]), as LLaVA-1.5;
* projector: LLaVA's 2-layer GELU MLP (1024 -> d -> d);
* LLM: Qwen2-0.5B-shaped (hidden 896, 24 layers, 14 query / 2 KV heads (GQA),
  SwiGLU 4864, vocabulary 151936, tied embeddings).

Input: batch 1, one prompt of ``--text-tokens`` text tokens around 576 image
placeholders (as the processor expands ``<image>``) and one 336x336 image. One
*prefill* is ``model(input_ids, attention_mask, pixel_values, logits_to_keep=1)``:
vision tower + projector + LLM over the whole prompt + the LM head on the last
position only, as ``generate()`` runs its first step (the full-vocabulary head on
every position would be 0.17 TFLOPs of work no generation does).

Candidates: the unreduced model and, per ``--methods`` entry,
``tokenreduce.apply(copy, <Method>Config(keep=--keep))`` on a structural copy that
shares the weights (``tokenreduce.bench.shared_copy``), so all candidates are timed
interleaved without extra parameter memory. A method that cannot be applied or run
is reported and skipped.

What is measured, and how
-------------------------
1. FLOPs (2 x MACs, matrix products only, CPU SDPA included) of one prefill with
   ``tokenreduce.measure.count_flops``, per component (vision tower, projector, LLM,
   LM head). Counted on CPU, not on ``meta``: the LLaVA adapter reads the placeholder
   positions from ``input_ids`` (data-dependent), and the counted forward doubles as
   the first warm-up. FLOPs-ideal speed-up = base FLOPs / reduced FLOPs.
   Cross-check: the counted total against the per-layer formula
   (``transformer_block_flops``: GELU MLP for CLIP, SwiGLU and GQA for the LLM) fed
   with the tokens each attention and each MLP actually received (recorded by hooks
   in the same forward), plus patch embedding, projector and LM head; the residual
   is the method's own matrix products (scores, similarities).
2. Latency of one prefill with ``time_interleaved`` (round-robin with rotated order,
   ``--warmup`` untimed + ``--repeats`` timed calls per candidate): min and median;
   measured speed-up = ratio of medians; efficiency = measured / ideal.
   **Target: measured / ideal >= 0.9.** ``ModuleTimer`` hooks split each timed
   prefill into vision tower, projector, LLM, LM head and the rest (embedding
   lookup, image-feature scatter, the adapter's placeholder shrinking); each part is
   compared with what its FLOPs predict (base time x FLOPs ratio), which says where
   a shortfall comes from.
3. Overhead: ``--profile-forwards`` prefills per candidate under ``torch.profiler``;
   the time in the ``tokenreduce.reduce`` ranges (``merge_slot.OVERHEAD_LABEL``,
   scoring + selection/merging, self + children) per prefill, as % of the unreduced
   median prefill. **Target: <= 3 %.** The adapter's placeholder shrinking
   (``PlaceholderShrinker._shorten_prefill``, outside that range) is wrapped in a
   profiler range ``bench.placeholder_shrink`` for the profiled calls only, and
   reported next to it. The same profiles give the top ops, base vs reduced.

Run (from the repository root, in the project's venv)::

    python benchmarks/bench_vlm_prefill.py                   # all methods, keep=64, 2 threads: ~4 min idle
    python benchmarks/bench_vlm_prefill.py --methods fastervlm divprune --keep 64 128 --repeats 8
    python benchmarks/bench_vlm_prefill.py --quick           # tiny shapes, smoke test, seconds

``--quick`` builds a tiny model of the same classes (vision 112 px / patch 14 -> 64
patches, 2+2 layers) so the whole pipeline runs in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import tokenreduce as tr
import transformers
from tokenreduce import registry
from tokenreduce.bench import shared_copy
from tokenreduce.config import ReductionConfig
from tokenreduce.measure import (
    ModuleTimer, Timing, analyse_overhead, count_flops, parallel_op_probe, profile_calls, speedup,
    time_interleaved, transformer_block_flops,
)
from tokenreduce.merge_slot import OVERHEAD_LABEL
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from common import format_table, log, report_contention, write_results

TARGET_EFFICIENCY = 0.9
TARGET_OVERHEAD_PCT = 3.0
BASE = "base"
SHRINK_LABEL = "bench.placeholder_shrink"
COMPONENTS = ("vision", "projector", "llm", "lm_head")
DEFAULT_METHODS = ["fastervlm", "visionzip", "divprune", "random", "ficoco_v"]


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and prompt shape; ``FULL`` is LLaVA-1.5 (CLIP-L/14-336) with a Qwen2-0.5B-sized LLM."""

    image: int = 336
    patch: int = 14
    vision_dim: int = 1024
    vision_mlp: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    dim: int = 896
    mlp: int = 4864
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    vocab: int = 151936
    keep: int = 64

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2


FULL = Shape()
QUICK = Shape(image=112, vision_dim=64, vision_mlp=128, vision_layers=3, vision_heads=4, dim=64, mlp=160, layers=2,
              heads=4, kv_heads=2, vocab=512, keep=16)
IMAGE_TOKEN, BOS = 7, 1


def build_model(shape: Shape, dtype: torch.dtype, seed: int) -> LlavaForConditionalGeneration:
    """The LLaVA model with transformers' own random init, created directly in ``dtype``.

    Creating the parameters in bf16 (default dtype switched for the construction)
    halves the time and the peak memory of building 0.8 B parameters compared with
    fp32 + ``.to(bf16)``. The init's small std (0.02) keeps the activations of the
    random network far from bf16's range limits.
    """
    vision = CLIPVisionConfig(image_size=shape.image, patch_size=shape.patch, hidden_size=shape.vision_dim,
                              intermediate_size=shape.vision_mlp, num_hidden_layers=shape.vision_layers,
                              num_attention_heads=shape.vision_heads, hidden_act="quick_gelu", projection_dim=768)
    text = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.dim, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                       rope_theta=1e6, tie_word_embeddings=True, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(shape: Shape, text_tokens: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """One prompt: BOS, a third of the text, the image placeholders, the rest of the text; one random image."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(IMAGE_TOKEN + 1, shape.vocab, (text_tokens - 1,), generator=g)
    before = (text_tokens - 1) // 3
    ids = torch.cat([torch.tensor([BOS]), text[:before], torch.full((shape.patches,), IMAGE_TOKEN), text[before:]])[None]
    pixels = torch.randn(1, 3, shape.image, shape.image, generator=g).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def parameter_counts(model: LlavaForConditionalGeneration) -> dict[str, int]:
    inner = model.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"vision": count(inner.vision_tower), "projector": count(inner.multi_modal_projector),
            "llm": count(inner.language_model), "total": count(model)}


def components(model: LlavaForConditionalGeneration) -> dict[str, nn.Module]:
    """The parts whose time and FLOPs are reported separately; the vision tower first (it starts each prefill)."""
    inner = model.model
    return {"vision": inner.vision_tower, "projector": inner.multi_modal_projector, "llm": inner.language_model,
            "lm_head": model.lm_head}


def vision_layers(model: LlavaForConditionalGeneration) -> list[nn.Module]:
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return list(tower.encoder.layers)


# --------------------------------------------------------------------------- FLOPs


class TokenRecorder:
    """Tokens entering every attention and every MLP of the listed layers (forward pre-hooks).

    Needed for the analytic cross-check: a method in the vision tower's merge slot
    runs a block's attention on more tokens than its MLP, and a reduction at a
    block's output shortens every later block.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.attn: list[int] = [0] * len(layers)
        self.mlp: list[int] = [0] * len(layers)
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.self_attn.register_forward_pre_hook(self._hook(self.attn, i), with_kwargs=True))
            self._handles.append(layer.mlp.register_forward_pre_hook(self._hook(self.mlp, i), with_kwargs=True))

    @staticmethod
    def _hook(store: list[int], i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            store[i] = int(x.shape[-2])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def analytic_flops(shape: Shape, vision: TokenRecorder, llm: TokenRecorder, projector_tokens: int) -> dict[str, int]:
    """The FLOPs the model's own layers should cost on the recorded token counts (METHODS.md FLOPs convention)."""

    def blocks(rec: TokenRecorder, d: int, m: int, ratio: float, mlp_matrices: int) -> int:
        attn = sum(transformer_block_flops(n, d, m, ratio, mlp_matrices=0) for n in rec.attn)
        mlp = sum(2 * mlp_matrices * n * d * m for n in rec.mlp)
        return attn + mlp

    patch_embed = 2 * shape.patches * 3 * shape.patch**2 * shape.vision_dim
    return {
        "vision": patch_embed + blocks(vision, shape.vision_dim, shape.vision_mlp, 1.0, 2),
        "projector": 2 * projector_tokens * (shape.vision_dim * shape.dim + shape.dim * shape.dim),
        "llm": blocks(llm, shape.dim, shape.mlp, shape.kv_heads / shape.heads, 3),
        "lm_head": 2 * shape.dim * shape.vocab,  # logits_to_keep=1: the last position only
    }


def count_candidate(name: str, model: LlavaForConditionalGeneration, fn: Callable[[], Any], shape: Shape,
                    handle: tr.Handle | None) -> dict[str, Any]:
    """Counted FLOPs per component, token counts, and the analytic cross-check, from one prefill."""
    vrec, lrec = TokenRecorder(vision_layers(model)), TokenRecorder(list(model.model.language_model.layers))
    projected: list[int] = []  # visual tokens entering the projector (all of them for a method at its output, H3)
    phook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda _m, args: projected.append(args[0].numel() // args[0].shape[-1]))
    try:
        report = count_flops(fn)
    finally:
        vrec.remove()
        lrec.remove()
        phook.remove()
    prefix = type(model).__name__
    paths = {"vision": f"{prefix}.model.vision_tower", "projector": f"{prefix}.model.multi_modal_projector",
             "llm": f"{prefix}.model.language_model", "lm_head": f"{prefix}.lm_head"}
    counted = {part: report.by_module.get(path, 0) for part, path in paths.items()}
    stats = handle.stats() if handle is not None else {}
    visual_out = stats["visual_tokens_out"][0] if stats.get("visual_tokens_out") else shape.patches
    analytic = analytic_flops(shape, vrec, lrec, sum(projected))
    return {
        "total": report.total,
        "counted": counted,
        "other": report.total - sum(counted.values()),
        "analytic": analytic,
        "residual": report.total - sum(analytic.values()),
        "visual_tokens": visual_out,
        "sequence": lrec.attn[0],
        "vision_attn_tokens": vrec.attn,
        "vision_mlp_tokens": vrec.mlp,
        "llm_attn_tokens": lrec.attn,
    }


# --------------------------------------------------------------------------- overhead instrumentation


def wrap_placeholder_shrink(model: LlavaForConditionalGeneration) -> Callable[[], None] | None:
    """Put the adapter's placeholder shrinking in a profiler range; returns the undo, or None if not found.

    The shrinker (``adapters.llava.PlaceholderShrinker``) shadows ``LlavaModel.forward``;
    its ``_shorten_prefill`` (find the placeholder runs, gather ids/mask/positions)
    runs outside ``tokenreduce.reduce``. This is benchmark-only instrumentation of a
    private method: if the adapter changes, the column reads "n/a" instead of failing.
    """
    shrinker = model.model.__dict__.get("forward")
    method = getattr(shrinker, "_shorten_prefill", None)
    if method is None:
        return None

    def timed(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(SHRINK_LABEL):
            return method(*args, **kwargs)

    shrinker._shorten_prefill = timed
    return lambda: shrinker.__dict__.pop("_shorten_prefill", None)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"registered method names (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--keep", type=int, nargs="+", default=None, help="visual tokens kept (default 64; 16 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed prefills per candidate (default 6; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills per candidate after the counted one")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads (default: all cores)")
    p.add_argument("--profile-forwards", type=int, default=2, help="profiled prefills per candidate (overhead, op breakdown)")
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens in the prompt (BOS included)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the whole pipeline in seconds")
    p.add_argument("--show-ops", type=int, default=12, help="top ops (by base self time) to print, 0 for none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    shape = QUICK if args.quick else FULL
    args.keep = args.keep or [shape.keep]
    args.repeats = args.repeats or (2 if args.quick else 6)
    return args


def reduce_layers(handle: tr.Handle | None) -> list[int] | None:
    """Which layers run a ``tokenreduce.reduce`` range per prefill: the vision schedule, or one step (H2/H3 sites)."""
    if handle is None:
        return None
    removed = handle.stats().get("vision", {}).get("removed_per_layer") or []
    return removed if sum(1 for k in removed if k) > 1 else [1]


def cand_name(method: str, keep: int, several: bool) -> str:
    return f"{method}@{keep}" if several else method


# --------------------------------------------------------------------------- run steps (bench_inllm runs them too)


@dataclasses.dataclass
class Run:
    """A run's model, its parameter counts and prompt, and the environment record that ``finish_run`` completes."""

    model: LlavaForConditionalGeneration
    params: dict[str, int]
    inputs: dict[str, torch.Tensor]
    env: dict[str, Any]
    probes: list[dict[str, Any]]
    t_start: float

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def start_run(args: argparse.Namespace, shape: Shape, dtype: torch.dtype) -> Run:
    """Set the threads, record the environment and the first parallel-op probe, then build the model and the prompt.

    ``args`` needs ``threads``, ``quick``, ``dtype``, ``seed`` and ``text_tokens``.
    """
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    env: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenreduce": tr.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
    }
    probes = [parallel_op_probe(args.threads)]

    log(f"building the {'quick' if args.quick else 'LLaVA-1.5 / Qwen2-0.5B'}-shaped model in {args.dtype} (random weights)")
    model = build_model(shape, dtype, args.seed)
    params = parameter_counts(model)
    inputs = make_inputs(shape, args.text_tokens, dtype, args.seed)
    return Run(model=model, params=params, inputs=inputs, env=env, probes=probes, t_start=t_start)


def finish_run(run: Run, threads: int, handles: dict[str, tr.Handle]) -> None:
    """Complete ``run.env`` (second parallel-op probe, load average at the end, run time), then remove the methods."""
    run.probes.append(parallel_op_probe(threads))
    run.env.update(loadavg_end=os.getloadavg(), parallel_op_probe=run.probes, run_seconds=time.perf_counter() - run.t_start)
    for handle in handles.values():
        handle.remove()


def failure(stage: str, exc: Exception) -> str:
    """Why a candidate is skipped, in one line: ``stage: ExceptionType: the message's first line``."""
    return f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def apply_candidates(model: nn.Module, configs: list[tuple[str, Callable[[], ReductionConfig]]]
                     ) -> tuple[dict[str, nn.Module], dict[str, tr.Handle], dict[str, str]]:
    """The unreduced model as ``BASE`` and, per (name, config maker), the config applied to a weight-sharing copy.

    A config that cannot be made or applied is reported, not fatal. Returns (models, handles, skipped: name -> why).
    """
    models: dict[str, nn.Module] = {BASE: model}
    handles: dict[str, tr.Handle] = {}
    skipped: dict[str, str] = {}
    for name, make_config in configs:
        copy_ = shared_copy(model)
        try:
            handles[name] = tr.apply(copy_, make_config())
        except Exception as exc:  # noqa: BLE001  (a method that cannot be applied is reported, not fatal)
            skipped[name] = failure("apply", exc)
            continue
        models[name] = copy_
    return models, handles, skipped


def prefill_calls(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """One prefill per candidate: the whole prompt, the LM head on the last position only (as ``generate``'s first step)."""

    def prefill(m: nn.Module) -> Callable[[], Any]:
        return lambda: m(**inputs, logits_to_keep=1)

    return {name: prefill(m) for name, m in models.items()}


def count_candidates(shape: Shape, models: dict[str, nn.Module], fns: dict[str, Callable[[], Any]],
                     handles: dict[str, tr.Handle], skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``count_candidate`` for every candidate in turn (the counted prefill is each one's first warm-up).

    A candidate whose prefill fails is recorded in ``skipped``, its method removed and it is
    dropped from ``models``, ``fns`` and ``handles``; a failing unreduced model is raised.
    """
    log("counting FLOPs (one prefill per candidate)")
    flops: dict[str, dict[str, Any]] = {}
    for name in list(models):
        try:
            flops[name] = count_candidate(name, models[name], fns[name], shape, handles.get(name))
        except Exception as exc:  # noqa: BLE001  (a method that fails on this model is reported, not fatal)
            skipped[name] = failure("prefill", exc)
            if name == BASE:
                raise
            handles.pop(name).remove()
            del models[name], fns[name]
    return flops


def time_components(models: dict[str, nn.Module], fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
                    ) -> tuple[dict[str, Timing], dict[str, dict[str, float]]]:
    """The prefills timed interleaved, each split by ``ModuleTimer`` hooks into its components.

    Returns (timings, parts): parts[name] is the median seconds per component over the timed
    calls, plus "other", the prefill minus the components.
    """
    timers = {name: ModuleTimer(components(models[name])) for name in models}
    timings = time_interleaved(fns, warmup=warmup, repeats=repeats)
    parts: dict[str, dict[str, float]] = {}
    for name in models:
        timed = timers[name].last(repeats)
        timers[name].remove()
        part = {c: statistics.median(f[c] for f in timed) for c in COMPONENTS}
        part["other"] = statistics.median(t - sum(f.values()) for t, f in zip(timings[name].times, timed))
        parts[name] = part
    return timings, parts


def run_record(args: argparse.Namespace, shape: Shape, run: Run, skipped: dict[str, str]) -> dict[str, Any]:
    """The results' first entries: the config, the environment, the shape, parameter counts, prompt length, skipped candidates."""
    return {"config": vars(args), "env": run.env, "shape": dataclasses.asdict(shape), "parameters": run.params,
            "prompt_tokens": run.prompt_tokens, "skipped": skipped}


def timing_record(timings: dict[str, Timing]) -> dict[str, dict[str, Any]]:
    """Each candidate's timed prefills (s), with their median and minimum, for the results."""
    return {n: {"times_s": list(t.times), "median_s": t.median, "min_s": t.min} for n, t in timings.items()}


def keep_config(method: str, keep: int) -> ReductionConfig:
    """The registered method's config at ``keep`` visual tokens."""
    return registry.config_class(method)(keep=keep)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    run = start_run(args, shape, dtype)
    log(f"{run.params['total'] / 1e6:.1f} M parameters; prompt of {run.prompt_tokens} tokens "
        f"({shape.patches} image placeholders); threads={torch.get_num_threads()}")

    several = len(args.keep) > 1
    models, handles, skipped = apply_candidates(run.model, [
        (cand_name(method, keep, several), functools.partial(keep_config, method, keep)) for keep in args.keep for method in args.methods])
    fns = prefill_calls(models, run.inputs)
    with torch.inference_mode():
        # ------------------------------------------------------------ 1. FLOPs (the counted prefill is the first warm-up)
        flops = count_candidates(shape, models, fns, handles, skipped)
        names = list(models)

        # ------------------------------------------------------------ 2. latency, interleaved, with component timers
        log(f"timing {names} interleaved: warmup={args.warmup}, repeats={args.repeats}")
        timings, parts = time_components(models, fns, args.warmup, args.repeats)

        # ------------------------------------------------------------ 3. overhead and op breakdown (profiler)
        log(f"profiling {args.profile_forwards} prefills per candidate")
        profiles: dict[str, dict[str, Any]] = {}
        for name in names:
            undo = wrap_placeholder_shrink(models[name]) if name != BASE else None
            prof, wall = profile_calls(fns[name], args.profile_forwards)
            if undo is not None:
                undo()
            p = analyse_overhead(prof, args.profile_forwards, reduce_layers(handles.get(name)))
            shrink = next((e.cpu_time_total / 1e3 / args.profile_forwards for e in prof.key_averages() if e.key == SHRINK_LABEL), None)
            profiles[name] = {**p, "shrink_ms": shrink if undo is not None else None, "wall_s_per_forward": wall / args.profile_forwards}
            del prof

    finish_run(run, args.threads, handles)

    rows = summary_rows(names, flops, timings, profiles, parts)
    results = {**run_record(args, shape, run, skipped), "flops": flops, "summary": rows, "timing": timing_record(timings),
               "components_s": parts, "profiles": {n: {k: v for k, v in p.items() if k != "table"} for n, p in profiles.items()}}
    print_report(args, shape, results, timings)
    write_results(args.out, results)
    return results


def predicted_parts(flops: dict[str, Any], parts: dict[str, dict[str, float]], name: str) -> dict[str, float]:
    """Seconds per component if each ran at the unreduced model's speed for that component: base time x FLOPs ratio."""
    pred = {}
    for c, base_s in parts[BASE].items():
        base_f = flops[BASE]["counted"].get(c)
        pred[c] = base_s * flops[name]["counted"][c] / base_f if base_f else base_s  # 'other' has no FLOPs: unchanged
    return pred


def speed_columns(name: str, flops: dict[str, Any], timings: dict[str, Timing], parts: dict[str, dict[str, float]]
                  ) -> dict[str, float]:
    """A candidate's prefill speed against the unreduced model's: FLOPs-ideal and measured (medians) speed-ups, their
    ratio, median and min ms, and the component-weighted ideal (each component at its unreduced FLOP rate)."""
    ideal = flops[BASE]["total"] / flops[name]["total"]
    measured = speedup(timings[BASE], timings[name])
    weighted = sum(parts[BASE].values()) / sum(predicted_parts(flops, parts, name).values())
    return {"ideal_speedup": ideal, "median_ms": 1e3 * timings[name].median, "min_ms": 1e3 * timings[name].min,
            "measured_speedup": measured, "efficiency": measured / ideal,
            "component_ideal_speedup": weighted, "efficiency_vs_component_ideal": measured / weighted}


def summary_rows(names: list[str], flops: dict[str, Any], timings: dict[str, Timing], profiles: dict[str, Any],
                 parts: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per candidate. Besides the FLOPs-ideal speed-up, a *component-weighted* ideal: the prefill time if
    every component kept the unreduced model's FLOP rate. The two differ when the components run at different
    FLOP rates (the part that shrinks, the LLM, may be the faster one); measured / component-weighted ideal is the
    share of the shortfall that reduced models themselves lose (smaller matmuls, overhead)."""
    base_t = timings[BASE]
    rows = []
    for name in names:
        speed = speed_columns(name, flops, timings, parts)
        ideal = speed["ideal_speedup"]
        p = profiles[name]
        rows.append({
            "name": name, "visual_tokens": flops[name]["visual_tokens"], "sequence": flops[name]["sequence"],
            "gflops": flops[name]["total"] / 1e9, "gflops_vision": flops[name]["counted"]["vision"] / 1e9,
            "gflops_llm": flops[name]["counted"]["llm"] / 1e9, **speed,
            "measured_speedup_min": base_t.min / timings[name].min, "efficiency_min": base_t.min / timings[name].min / ideal,
            "overhead_ms": p["reduce_ms"], "overhead_pct_of_base": 100 * p["reduce_ms"] / 1e3 / base_t.median,
            "overhead_min_ms": p["reduce_min_over_forwards_ms"],
            "shrink_ms": p["shrink_ms"],
            "meets_efficiency": None if name == BASE else speed["efficiency"] >= TARGET_EFFICIENCY,
            "meets_overhead": None if name == BASE else 100 * p["reduce_ms"] / 1e3 / base_t.median <= TARGET_OVERHEAD_PCT,
        })
    return rows


# --------------------------------------------------------------------------- printing


def print_report(args: argparse.Namespace, shape: Shape, results: dict[str, Any], timings: dict[str, Timing]) -> None:
    env, params, rows, flops, parts = results["env"], results["parameters"], results["summary"], results["flops"], results["components_s"]
    print(f"\n=== Prefill of a LLaVA-1.5-shaped VLM{' (--quick: tiny shapes, numbers meaningless)' if args.quick else ''}: "
          f"{args.dtype}, CPU, batch 1, {results['prompt_tokens']} prompt tokens ({shape.patches} image + {args.text_tokens} text), "
          f"{env['torch_threads']} threads ===")
    print(f"vision: CLIP {shape.vision_layers} layers x {shape.vision_dim} (MLP {shape.vision_mlp}, {shape.vision_heads} heads), "
          f"{shape.image} px / patch {shape.patch}, feature layer -2, default strategy; {params['vision'] / 1e6:.1f} M params")
    print(f"projector: 2-layer GELU {shape.vision_dim}->{shape.dim}->{shape.dim}; {params['projector'] / 1e6:.2f} M params")
    print(f"LLM: Qwen2 {shape.layers} layers x {shape.dim} (SwiGLU {shape.mlp}, {shape.heads} heads / {shape.kv_heads} KV), "
          f"vocab {shape.vocab}, tied; {params['llm'] / 1e6:.1f} M params;  total {params['total'] / 1e6:.1f} M")
    print_run(args, results)

    print(f"\n-- Summary (FLOPs = 2 x MACs, counted; speed-ups from medians; overhead = '{OVERHEAD_LABEL}' range as % of the "
          f"unreduced median prefill)")
    head = ["candidate", "vis tok", "seq", "GFLOPs", "vision", "LLM", "ideal x", "median ms", "min ms", "meas. x", "meas/ideal",
            "ovh ms", "ovh %", "shrink ms", "targets"]
    table = []
    for r in rows:
        flags = "" if r["meets_efficiency"] is None else (
            ("ok" if r["meets_efficiency"] else f"eff<{TARGET_EFFICIENCY}") + " " + ("ok" if r["meets_overhead"] else f"ovh>{TARGET_OVERHEAD_PCT:g}%"))
        table.append([r["name"], str(r["visual_tokens"]), str(r["sequence"]), gf(r['gflops']), gf(r['gflops_vision']),
                      gf(r['gflops_llm']), f"{r['ideal_speedup']:.3f}", f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}",
                      f"{r['measured_speedup']:.3f}", f"{r['efficiency']:.3f}", f"{r['overhead_ms']:.2f}",
                      f"{r['overhead_pct_of_base']:.2f}", "n/a" if r["shrink_ms"] is None else f"{r['shrink_ms']:.2f}", flags])
    print(format_table(head, table))
    print(f"targets: measured/ideal >= {TARGET_EFFICIENCY}, overhead <= {TARGET_OVERHEAD_PCT:g}% of the unreduced prefill")
    print("from minimum times instead (the least-disturbed call): " + "; ".join(
        f"{r['name']} {r['measured_speedup_min']:.3f}x = {r['efficiency_min']:.3f} of ideal" for r in rows[1:]))
    print("overhead, fastest of the profiled prefills per op: " + "; ".join(
        f"{r['name']} {r['overhead_min_ms'] or 0:.2f} ms" for r in rows[1:]))
    for name, t in timings.items():
        print(f"  {name:>10} prefill s: " + ", ".join(f"{v:.3f}" for v in t.times))

    print("\n-- FLOPs cross-check: counted vs per-layer formula on the recorded token counts (GFLOPs)")
    head = ["candidate", "counted", "analytic", "residual", "vision attn tokens (first..last)", "vision MLP tokens (last 3)", "LLM seq"]
    table = []
    for name, f in flops.items():
        table.append([name, f"{f['total'] / 1e9:.3f}", f"{sum(f['analytic'].values()) / 1e9:.3f}", f"{f['residual'] / 1e9:+.4f}",
                      f"{f['vision_attn_tokens'][0]}..{f['vision_attn_tokens'][-1]}", str(f["vision_mlp_tokens"][-3:]), str(f["sequence"])])
    print(format_table(head, table))
    print("  residual = the method's own matrix products (scores, similarities) and anything the formula misses; "
          "vision layers run to the last one (HF computes all hidden states; -2 is selected).")

    print("\n-- Where the time goes: median ms per component in the timed prefills, vs base ms x (component FLOPs ratio)")
    print("  unreduced FLOP rate per component: " + ", ".join(
        f"{c} {flops[BASE]['counted'][c] / parts[BASE][c] / 1e9:.1f} GFLOP/s" for c in COMPONENTS if parts[BASE][c] > 0))
    head = ["candidate"] + [f"{c} ms (pred)" for c in (*COMPONENTS, "other")] + ["excess ms", "comp.-weighted ideal x", "meas/that"]
    table = []
    by_name = {r["name"]: r for r in rows}
    for name in parts:
        pred = predicted_parts(flops, parts, name)
        cells = [name] + [f"{1e3 * parts[name][c]:.1f} ({1e3 * pred[c]:.1f})" for c in (*COMPONENTS, "other")]
        cells.append(f"{1e3 * (sum(parts[name].values()) - sum(pred.values())):+.1f}")
        cells += [f"{by_name[name]['component_ideal_speedup']:.3f}", f"{by_name[name]['efficiency_vs_component_ideal']:.3f}"]
        table.append(cells)
    print(format_table(head, table))
    print("  comp.-weighted ideal = base prefill / sum of the predicted component times: the speed-up if nothing but the "
          "FLOPs changed, at each component's own unreduced FLOP rate; FLOPs-ideal / comp.-weighted ideal is the part of "
          "the shortfall due to the components' different FLOP rates, not to the method.")
    print("  'other' = prefill minus the four components: embedding lookup, image-feature scatter, causal-mask setup, "
          "the adapter's placeholder shrinking (vision/projector times include hooks running inside them, e.g. the reduction).")

    if args.show_ops:
        print(f"\n-- Profiler: top ops by self CPU ms per prefill (base order); '{OVERHEAD_LABEL}' inside-range ops below")
        base_ops = profiles_self(results, BASE)
        keys = sorted(base_ops, key=lambda k: -base_ops[k])[: args.show_ops]
        names = list(parts)
        head = ["op"] + names
        table = [[k[:44]] + [f"{profiles_self(results, n).get(k, 0.0):.1f}" for n in names] for k in keys]
        print(format_table(head, table))
        for name in names[1:]:
            inside = results["profiles"][name]["inside_ms"]
            top = sorted(inside.items(), key=lambda kv: -kv[1])[:6]
            print(f"  {name}: range {results['profiles'][name]['reduce_ms']:.2f} ms, glue (range self) "
                  f"{results['profiles'][name]['reduce_self_ms']:.2f} ms; " + ", ".join(f"{k} {v:.2f}" for k, v in top))


def print_run(args: argparse.Namespace, results: dict[str, Any], repeats_more: str = "") -> None:
    """The report's run lines: versions, load average, run time, repetitions (then ``repeats_more``), the parallel-op
    probe with its contention warning, and the skipped candidates."""
    env = results["env"]
    print(f"torch {env['torch']}, transformers {env['transformers']}; load average (1/5/15 min) start "
          + "/".join(f"{x:.2f}" for x in env["loadavg_start"]) + ", end " + "/".join(f"{x:.2f}" for x in env["loadavg_end"])
          + f"; run took {env['run_seconds']:.0f} s; warmup {args.warmup} (+1 counted), repeats {args.repeats}{repeats_more}")
    report_contention(env["parallel_op_probe"])
    for name, why in results["skipped"].items():
        print(f"SKIPPED {name}: {why}")


def gf(value: float) -> str:
    """GFLOPs with 4 significant digits (the --quick model has a few MFLOPs)."""
    return f"{value:.4g}"


def profiles_self(results: dict[str, Any], name: str) -> dict[str, float]:
    return results["profiles"][name]["self_ms"]


if __name__ == "__main__":
    main()
