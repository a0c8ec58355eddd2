"""Benchmark: ToCa and FORA on a PixArt-alpha-shaped transformer, FLOPs vs measured speed and cache memory.

Model: diffusers ``PixArtTransformer2DModel`` with PixArt-alpha XL/2's shape (28
blocks, hidden 1152 = 16 heads x 72, patch 2, 4 latent channels, learned sigma,
adaLN-single, cross-attention over a caption projected from 4096-d T5
embeddings), random weights (speed does not depend on them), ``--dtype``
(default bf16) on CPU, under ``torch.inference_mode()``. Input: ``--latent`` x
``--latent`` latents (32 = 256 x 256 pixels through the VAE's factor 8, i.e.
16 x 16 = 256 image tokens; 64 = 512 px = 1024 tokens) and ``--text-tokens``
random caption embeddings (PixArt pads T5 prompts to 120 tokens).

Sampling: a pipeline-free loop with diffusers' ``DPMSolverMultistepScheduler``
(DPM-Solver++ order 2, PixArt-alpha's sampler), ``--steps`` steps (20), CFG
``--guidance`` (4.5) as one call per step on the doubled batch [uncond, cond]
(diffusers' order). Latents and the solver run in float32, the transformer in
``--dtype``.

Candidates: uncached; ToCa with the PixArt preset (METHODS.md D1.5 / D1.6:
N = 3, fresh ratio 0.30, cross-attention x0.6 and MLP x1.6 of it, self-attention
reused whole); FORA with ``--fora-interval`` (default 3, the usual comparison).
Each is a weight-sharing copy (``tokenreduce.bench.shared_copy``) so all are
timed in one process.

What is measured, and how
-------------------------
1. FLOPs (2 x MACs) of one whole generation with ``tokenreduce.measure.count_flops``
   (``FlopCounterMode`` with the CPU SDPA formula), on CPU, the method applied so
   that skipped work is not counted; ideal speed-up = base FLOPs / method FLOPs.
   Cross-check: ``handle.stats()``'s analytic block FLOPs (``flops_ratio``) of the
   same generation.
2. Latency of whole generations with ``time_interleaved`` (``--warmup`` +
   ``--repeats`` per candidate, round-robin, rotated order); measured speed-up =
   ratio of medians; efficiency = measured / ideal (**target >= 0.8**). The same
   timed calls also record the process's CPU time (``time.process_time``): on a
   machine shared with other jobs, wall time includes the time spent waiting for
   a core, which hits the candidates unevenly; the CPU time of the work itself
   does not (with ``--threads 1`` it is the single thread's busy time). Both
   speed-ups are reported; the target is read on CPU time when the load average
   exceeds the cores.
3. Cache memory: the bytes held by the method's caches (every cached tensor,
   ``handle.stats()["cache_bytes"]``) after every step of the counted
   generation, maximum over steps; plus the process's peak RSS during one
   generation (``peak_memory``: high-water mark and delta over the baseline).
4. ``--profile``: one generation per method under ``torch.profiler``: the ops
   where the time goes, base vs method, and the time of ToCa's own work
   (scoring, top-k, gather / scatter).

Run (from the repository root, in the project's venv)::

    python benchmarks/bench_cache_pixart.py                     # 28 blocks, 32x32 latents, 20 steps, bf16
    python benchmarks/bench_cache_pixart.py --profile --out r.json
    python benchmarks/bench_cache_pixart.py --quick             # 2 blocks of 2 heads, 8x8 latents, 6 steps: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from torch.profiler import ProfilerActivity, profile

import tokenreduce as tr
from tokenreduce.bench import shared_copy
from tokenreduce.diffusion import FORAConfig, ToCaConfig
from tokenreduce.measure import count_flops, peak_memory, speedup, time_interleaved

TARGET_EFFICIENCY = 0.8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
HEAD_DIM = 72
QUICK = {"blocks": 2, "heads": 2, "latent": 8, "steps": 6, "text_tokens": 16, "repeats": 1, "warmup": 0}
TOCA_OPS = ("aten::argsort", "aten::sort", "aten::index_select", "aten::scatter_", "aten::softmax", "aten::_softmax", "aten::log")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(blocks: int, heads: int, latent: int, dtype: torch.dtype, seed: int) -> PixArtTransformer2DModel:
    """PixArt-alpha XL/2's architecture (heads of 72 channels) with ``blocks`` blocks, random weights in ``dtype``."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=blocks,
        cross_attention_dim=heads * HEAD_DIM, caption_channels=4096, sample_size=latent, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()
    with torch.no_grad():  # zero-initialised layers would make blocks identities and caches trivially exact
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.02)
    return model.to(dtype)


def make_sampler(model: torch.nn.Module, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """A pipeline-free DPM-Solver++ (order 2) loop with batched CFG; ``on_step()`` is called after every step."""
    g = torch.Generator().manual_seed(args.seed)
    dtype = next(model.parameters()).dtype
    latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    text = (torch.randn(args.batch, args.text_tokens, 4096, generator=g) * 0.1).to(dtype)
    null = (torch.randn(args.batch, args.text_tokens, 4096, generator=g) * 0.1).to(dtype)
    encoder = torch.cat([null, text])
    mask = torch.ones(2 * args.batch, args.text_tokens, dtype=torch.long)

    def sample(m: torch.nn.Module, on_step: Callable[[], None] = lambda: None) -> torch.Tensor:
        scheduler = DPMSolverMultistepScheduler()  # linear betas, DPM-Solver++, order 2: PixArt-alpha's defaults
        scheduler.set_timesteps(args.steps)
        x = latents.clone()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                out = m(
                    torch.cat([x, x]).to(dtype), encoder_hidden_states=encoder, encoder_attention_mask=mask,
                    timestep=t.expand(2 * args.batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
                )[0]
                uncond, cond = out[:, :4].float().chunk(2)  # drop the learned-sigma channels
                x = scheduler.step(uncond + args.guidance * (cond - uncond), t, x).prev_sample
                on_step()
        return x

    return sample


def candidates(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "base": None,
        "toca": ToCaConfig(preset="pixart", num_steps=args.steps),
        "fora": FORAConfig(interval=args.fora_interval),
    }


def count_generation(m: torch.nn.Module, handle: tr.Handle | None, sample: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """FLOPs of one generation, the handle's analytic counters for it, and its caches' peak bytes over the steps."""
    peak = [0]

    def on_step() -> None:
        if handle is not None:
            peak[0] = max(peak[0], handle.stats()["cache_bytes"])

    if handle is not None:
        handle.reset()
    out: dict[str, Any] = {}
    report = count_flops(lambda: out.setdefault("latents", sample(m, on_step)))
    stats = handle.stats() if handle is not None else {}
    return {
        "flops": report.total,
        "flops_ratio_analytic": stats.get("flops_ratio", 1.0),
        "full_steps": stats.get("full_steps"),
        "partial_steps": stats.get("partial_steps"),
        "refreshed_tokens": stats.get("refreshed_tokens"),
        "cache_bytes_peak": peak[0],
        "latents": out["latents"],
    }


def profile_generation(sample: Callable[[], Any]) -> dict[str, float]:
    """Self CPU ms per op over one generation."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=28, help="transformer blocks (PixArt-alpha XL/2: 28)")
    p.add_argument("--heads", type=int, default=16, help="attention heads of 72 channels (PixArt-alpha XL/2: 16, hidden 1152)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px = 256 tokens; 64 = 512 px = 1024 tokens)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--text-tokens", type=int, default=120, help="caption tokens (PixArt pads T5 prompts to 120)")
    p.add_argument("--batch", type=int, default=1, help="images per generation (the transformer sees twice as many: CFG)")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--fora-interval", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per candidate")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per candidate before timing")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads (default: all cores)")
    p.add_argument("--profile", action="store_true", help="profile one generation per candidate (op breakdown)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 blocks of 2 heads, 8x8 latents, 6 steps, 16 text tokens, 1 repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("blocks", "heads", "latent", "steps", "text_tokens", "batch", "repeats", "threads", "fora_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.latent % 2:
        p.error("--latent must be even (2 x 2 patches)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    log(f"building PixArt-alpha-shaped transformer: {args.blocks} blocks, hidden {args.heads * HEAD_DIM}, {args.latent}x{args.latent} latents, {args.dtype}")
    base = build_model(args.blocks, args.heads, args.latent, dtype, args.seed)
    sample = make_sampler(base, args)
    models: dict[str, torch.nn.Module] = {}
    handles: dict[str, tr.Handle | None] = {}
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, config in candidates(args).items():
            m = base if config is None else shared_copy(base)
            handles[name] = None if config is None else tr.apply(m, config)
            models[name] = m
            log(f"{name}: counting FLOPs of one generation")
            rows[name] = count_generation(m, handles[name], sample)
            rows[name]["config"] = None if config is None else config.to_dict()
        log(f"timing: {args.warmup} warm-up + {args.repeats} generations per candidate, interleaved")
        cpu: dict[str, list[float]] = {name: [] for name in models}

        def timed(name: str, m: torch.nn.Module) -> Callable[[], None]:
            def call() -> None:
                start = time.process_time()
                sample(m)
                cpu[name].append(time.process_time() - start)

            return call

        timings = time_interleaved({name: timed(name, m) for name, m in models.items()}, args.warmup, args.repeats)
        for name, m in models.items():
            log(f"{name}: peak memory of one generation")
            memory = peak_memory(lambda m=m: sample(m))
            rows[name].update(rss_peak_bytes=memory.peak_bytes, rss_delta_bytes=memory.delta_bytes)
        profiles = {name: profile_generation(lambda m=m: sample(m)) for name, m in models.items()} if args.profile else {}
    finally:
        for handle in handles.values():
            if handle is not None:
                handle.remove()
    reference = rows["base"].pop("latents")
    for name, row in rows.items():
        latents = row.pop("latents", reference)
        row["ideal_speedup"] = rows["base"]["flops"] / row["flops"]
        row["latency_s"] = timings[name].median
        row["latency_samples_s"] = list(timings[name].times)
        row["measured_speedup"] = speedup(timings["base"], timings[name])
        row["efficiency"] = row["measured_speedup"] / row["ideal_speedup"]
        row["cpu_samples_s"] = cpu[name][args.warmup :]
        row["cpu_s"] = statistics.median(row["cpu_samples_s"])
        row["cpu_speedup"] = statistics.median(cpu["base"][args.warmup :]) / row["cpu_s"]
        row["cpu_efficiency"] = row["cpu_speedup"] / row["ideal_speedup"]
        row["latent_rel_error"] = float((latents - reference).norm() / reference.norm())
    results = {
        "model": {"class": "PixArtTransformer2DModel", "blocks": args.blocks, "hidden": args.heads * HEAD_DIM, "heads": args.heads, "patch": 2,
                  "latent": args.latent, "image_tokens": (args.latent // 2) ** 2, "text_tokens": args.text_tokens},
        "dtype": args.dtype, "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "torch": torch.__version__, "rows": rows, "profiles": profiles,
    }
    print_report(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def print_report(results: dict[str, Any]) -> None:
    m = results["model"]
    print(
        f"PixArt-alpha-shaped transformer: {m['blocks']} blocks, hidden {m['hidden']}, {m['image_tokens']} image tokens "
        f"({m['latent']}x{m['latent']} latents), {m['text_tokens']} text tokens, {results['dtype']}, {results['threads']} threads; "
        f"DPM-Solver++ {results['steps']} steps, CFG {results['guidance']} (doubled batch of {2 * results['batch']}); "
        f"load average {results['machine']['load_avg'][0]:.1f}"
    )
    head = [
        "method", "TFLOPs/gen", "blocks ratio", "ideal x", "wall s", "wall x", "wall/ideal", "CPU s", "CPU x", "CPU/ideal",
        "cache MiB", "RSS peak MiB", "RSS delta MiB", "latent err",
    ]
    lines = [head]
    for name, r in results["rows"].items():
        lines.append([
            name, f"{r['flops'] / 1e12:.3f}", f"{r['flops_ratio_analytic']:.3f}", f"{r['ideal_speedup']:.2f}", f"{r['latency_s']:.2f}",
            f"{r['measured_speedup']:.2f}", f"{r['efficiency']:.2f}", f"{r['cpu_s']:.2f}", f"{r['cpu_speedup']:.2f}",
            f"{r['cpu_efficiency']:.2f}", f"{r['cache_bytes_peak'] / 2**20:.1f}",
            f"{r['rss_peak_bytes'] / 2**20:.0f}", f"{r['rss_delta_bytes'] / 2**20:.0f}", f"{r['latent_rel_error']:.3f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    loaded = results["machine"]["load_avg"][0] > results["machine"]["cores"]
    key = "cpu_efficiency" if loaded else "efficiency"
    low = [name for name, r in results["rows"].items() if name != "base" and r[key] < TARGET_EFFICIENCY]
    print(
        f"target measured/ideal >= {TARGET_EFFICIENCY} on {'CPU time (load above the cores)' if loaded else 'wall time'}: "
        + (f"missed by {', '.join(low)}" if low else "met")
    )
    for name, ops in results["profiles"].items():
        total = sum(ops.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        own = sum(ops.get(op, 0.0) for op in TOCA_OPS)
        print(f"profile {name}: {total:.0f} ms self CPU; top: " + ", ".join(f"{k} {v:.0f}" for k, v in top)
              + f"; scoring/selection/gather/scatter ops {own:.0f} ms ({100 * own / total:.1f} %)")


if __name__ == "__main__":
    main()
