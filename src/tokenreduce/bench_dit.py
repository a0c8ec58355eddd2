"""The benchmark of diffusion caching methods on the zoo's ``digits-dit``.

A caching method does not change one forward pass but a whole sampling run (it
decides per step what to recompute), so the ViT harness (:mod:`tokenreduce.bench`,
one forward per input, logits compared) does not fit. Here each candidate is a
shared-weight copy of the transformer with a caching method applied, and every
candidate samples with the same DDIM loop (:func:`tokenreduce.zoo.dit_sampling.sample`),
the same labels (0..9 repeated) and the same starting noise, so that:

* TFLOPs are counted over one full sampling of ONE sample (all steps, CFG included)
  with the method applied, so skipped modules are really not counted;
* latency is the median of interleaved timed samplings of one batch (A/B with the
  uncached model, :func:`tokenreduce.measure.time_interleaved`);
* quality is the digits-vit judge's accuracy on the generated digits and PSNR /
  SSIM to the uncached samples from the same noise (the base row's PSNR is
  ``inf``: identical images; JSON writes it as ``Infinity``, which Python's
  ``json`` reads back as ``float("inf")``).

The cheapest competitor of any cache is sampling with fewer steps. With
``fewer_steps`` the uncached model also samples with fewer DDIM steps
(pseudo-method ``fewer_steps``): either given step counts, or, with
``match_flops``, one per method, ``round(steps * method FLOPs / base FLOPs)``, so
that a method is compared with plain sampling at the same compute (e.g. ToCa at
2x fewer FLOPs against 25 instead of 50 steps). Their PSNR / SSIM are measured
against the full-step uncached samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, registry
from .bench import shared_copy
from .config import ReductionConfig
from .errors import ConfigError
from .measure import count_flops, peak_memory, speedup, time_interleaved
from .zoo import dit_sampling

MODEL_SPEC = "zoo:digits-dit"
FEWER_STEPS = "fewer_steps"  # the pseudo-method of the fewer-steps baseline rows
GRID_COLUMNS = dit_sampling.NUM_CLASSES  # one column per digit class: enough to see each method's effect


@dataclasses.dataclass
class DitRow:
    """One line of the results table; ``images`` (the generated samples) is kept for the grid, not the JSON."""

    method: str
    config: dict[str, Any] | None
    steps: int
    tflops: float  # per image, the whole sampling run
    ideal_speedup: float  # base FLOPs / these FLOPs
    latency_ms: float  # median, one batch, whole sampling run
    speedup: float  # measured, by medians
    peak_mb: float  # peak memory added by sampling one batch
    accuracy: float  # judge's class predictions against the labels
    psnr: float  # dB to the uncached samples; inf for the base row
    ssim: float
    cache_stats: dict[str, Any]  # the handle's counters for one sampling of one sample (full / partial steps, ...)
    images: torch.Tensor = dataclasses.field(repr=False)


def make_configs(methods: list[str], extra: dict[str, Any], steps: int, skipped: list[str]) -> list[ReductionConfig]:
    """One config per method with ``extra`` fields; ``num_steps`` is filled in where the config has it.

    A bare transformer cannot tell these methods how many steps a generation has,
    and their schedules depend on it, so the bench passes ``--steps`` unless
    ``--set num_steps=...`` overrides it. A method that has no field named in
    ``extra`` (one ``--set`` for a sweep of several methods) or rejects its value
    is skipped with the reason appended to ``skipped``.
    """
    configs = []
    for name in methods:
        cls = registry.config_class(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - fields)
        if unknown:
            skipped.append(f"{name}: no setting {', '.join(unknown)}")
            continue
        values = {"num_steps": steps, **extra} if "num_steps" in fields else extra
        try:
            configs.append(cls(**values))
        except ConfigError as error:
            skipped.append(str(error))
    return configs


def run_dit_bench(
    model: nn.Module,
    configs: list[ReductionConfig],
    *,
    samples: int = 20,
    steps: int = 50,
    guidance: float = 2.0,
    batch_size: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    seed: int = 0,
    skipped: list[str] | None = None,
    progress: Callable[[list], list] = lambda items: items,
    fewer_steps: Sequence[int] = (),
    match_flops: bool = False,
) -> list[DitRow]:
    """Benchmark the uncached transformer and every config; returns the base row first.

    ``samples`` images (labels 0..9 repeated, noise from ``seed``) are generated
    in chunks of ``batch_size`` for quality; latency and memory use the first
    chunk. A config the model cannot satisfy (at apply or at the start of a
    generation) is left out with its message appended to ``skipped``; with
    ``skipped=None`` the error is raised. ``fewer_steps`` / ``match_flops`` add
    uncached rows with fewer steps after the methods (module doc).
    """
    if any(n < 1 or n >= steps for n in fewer_steps):
        raise ConfigError(f"fewer_steps={list(fewer_steps)}: each must be between 1 and steps - 1 = {steps - 1}")
    labels = torch.arange(samples) % dit_sampling.NUM_CLASSES
    size = model.config.sample_size
    noise = torch.randn(samples, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))

    def generate(m: nn.Module, count: int, n_steps: int) -> torch.Tensor:
        """The first ``count`` samples, sampled ``batch_size`` at a time."""
        spans = [slice(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
        chunks = [dit_sampling.sample(m, labels[s], steps=n_steps, guidance=guidance, noise=noise[s]) for s in spans]
        return torch.cat(chunks)

    models: list[nn.Module] = [model]
    handles: list[api.Handle | None] = [None]
    flops: list[int] = []
    stats: list[dict[str, Any]] = []
    row_steps: list[int] = [steps]
    try:
        for config in progress([None, *configs]):
            candidate = model if config is None else shared_copy(model)
            handle = None
            try:
                if config is not None:
                    handle = api.apply(candidate, config)
                # Counting FLOPs runs the first generation, where a schedule's step check happens.
                flops.append(count_flops(lambda: generate(candidate, 1, steps)).total)
            except ConfigError as error:
                if handle is not None:
                    handle.remove()
                if skipped is None:
                    raise
                skipped.append(str(error))
                continue
            stats.append(_counters(handle))
            if handle is not None:
                handles.append(handle)
                models.append(candidate)
                row_steps.append(steps)
        matched = [max(1, round(steps * f / flops[0])) for f in flops[1:]] if match_flops else []
        for n_steps in sorted({n for n in [*fewer_steps, *matched] if n < steps}, reverse=True):
            flops.append(count_flops(lambda n_steps=n_steps: generate(model, 1, n_steps)).total)
            stats.append({})
            handles.append(None)
            models.append(model)
            row_steps.append(n_steps)
        images = [generate(m, samples, n) for m, n in zip(models, row_steps)]
        batch = min(batch_size, samples)
        runs = {str(i): (lambda m=m, n=n: generate(m, batch, n)) for i, (m, n) in enumerate(zip(models, row_steps))}
        timings = time_interleaved(runs, warmup, repeats)
        memory = [peak_memory(run).delta_bytes for run in runs.values()]
        judged = [dit_sampling.judge(x) for x in images]
    finally:
        for handle in handles[1:]:
            if handle is not None:
                handle.remove()
    return [
        DitRow(
            method=handle.config.method if handle else "base" if i == 0 else FEWER_STEPS,
            config=handle.config.to_dict() if handle else None,
            steps=row_steps[i],
            tflops=flops[i] / 1e12,
            ideal_speedup=flops[0] / flops[i],
            latency_ms=timings[str(i)].median * 1e3,
            speedup=speedup(timings["0"], timings[str(i)]),
            peak_mb=memory[i] / 2**20,
            accuracy=(judged[i] == labels).float().mean().item(),
            psnr=dit_sampling.psnr(images[0], images[i]),
            ssim=dit_sampling.ssim(images[0], images[i]),
            cache_stats=stats[i],
            images=images[i],
        )
        for i, handle in enumerate(handles)
    ]


def _counters(handle: api.Handle | None) -> dict[str, Any]:
    """What the method did in the FLOPs run (one generation), without the config echo."""
    if handle is None:
        return {}
    identity = {"method", "config", "model", "active"}
    return {k: v for k, v in handle.stats().items() if k not in identity}


def settings_label(config: dict[str, Any] | None) -> str:
    """The fields that differ from the method's defaults (``num_steps`` is the step count, shown apart)."""
    if config is None:
        return "-"
    defaults = registry.config_class(config["method"])().to_dict()
    changed = [f"{k}={v}" for k, v in config.items() if k not in ("method", "version", "num_steps") and defaults[k] != v]
    return " ".join(changed) or "defaults"


def format_table(rows: list[DitRow], markdown: bool = False) -> str:
    """The results as a fixed-width text table, or as Markdown."""
    head = ["method", "settings", "steps", "TFLOPs/img", "ideal x", "measured x", "latency ms", "peak MB", "acc %", "PSNR dB", "SSIM"]
    lines = [head] + [
        [
            r.method, settings_label(r.config), str(r.steps), f"{r.tflops:.4f}", f"{r.ideal_speedup:.2f}", f"{r.speedup:.2f}",
            f"{r.latency_ms:.1f}", f"{r.peak_mb:.1f}", f"{100 * r.accuracy:.1f}", f"{r.psnr:.2f}", f"{r.ssim:.4f}",
        ]
        for r in rows
    ]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def rows_to_json(rows: list[DitRow], skipped: list[str], guidance: float) -> dict[str, Any]:
    """The report without the images (PSNR inf is written as ``Infinity``, see the module doc)."""
    return {
        "model": MODEL_SPEC,
        "samples": len(rows[0].images),
        "guidance": guidance,
        "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "images"} for r in rows],
        "skipped": skipped,
    }


def save_grid(rows: list[DitRow], path: str | Path) -> None:
    """One row of samples per method (uncached first); column j is the same noise and label for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(GRID_COLUMNS, len(rows[0].images))
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9 + 1.6, len(rows) * 0.9), squeeze=False)
    for row, line in zip(rows, axes):
        for image, ax in zip(row.images[:columns], line):
            ax.imshow(((image[0] + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        line[0].set_ylabel(row.method, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_cli(args: argparse.Namespace, extra: dict[str, Any]) -> int:
    """``tokenreduce bench zoo:digits-dit ...``: the methods (or ``--sweep``: all supported, defaults) against the uncached model.

    ``--guidance 1`` samples without classifier-free guidance (one call per step);
    ``--fewer-steps N ...`` adds uncached rows with N steps, ``--fewer-steps``
    alone one per method at the method's FLOPs (see the module doc).

    ``--keep`` / ``--ratio`` are token budgets; caching methods have no common
    budget, so they are refused here (use ``--set``), as is ``--plot`` (its axis
    is the ViT harness's quality).
    """
    if args.keep or args.ratio:
        raise ValueError("zoo:digits-dit takes no --keep/--ratio; set a method's options with --set KEY=VALUE")
    if args.plot:
        raise ValueError("zoo:digits-dit has no Pareto plot; --grid writes its samples side by side")
    if args.dtype != "float32":
        raise ValueError("zoo:digits-dit is benchmarked in float32 (the DDIM loop keeps float32 latents)")
    from tqdm import tqdm

    from . import zoo

    model = zoo.load_model("digits-dit")
    methods = args.method
    if methods == ["all"] or (args.sweep and not methods):
        methods = api.supported(model)
    if not methods:
        raise ValueError("give --method NAME (see `tokenreduce methods`) or --sweep")
    skipped: list[str] = []
    configs = make_configs(methods, extra, args.steps, skipped)
    if len(methods) == 1 and skipped:
        raise ConfigError(skipped[0])

    def progress(items: list) -> Any:
        return tqdm(items, desc="sampling", disable=args.no_progress)

    fewer = args.fewer_steps
    rows = run_dit_bench(
        model, configs, samples=args.samples, steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
        warmup=args.warmup, repeats=args.repeats, skipped=skipped if len(methods) > 1 else None, progress=progress,
        fewer_steps=fewer or [], match_flops=fewer == [],
    )
    print(
        f"{MODEL_SPEC}: {args.samples} samples, DDIM {args.steps} steps, CFG {args.guidance}, batch {min(args.batch_size, args.samples)}, "
        f"latency = median of {args.repeats} interleaved runs"
    )
    print(format_table(rows, markdown=args.markdown))
    for reason in skipped:
        print(f"skipped: {reason}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows_to_json(rows, skipped, args.guidance), f, indent=2)
    if args.grid:
        save_grid(rows, args.grid)
    return 0
