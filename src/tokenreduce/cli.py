"""``tokenreduce`` command line: ``bench`` (measure methods side by side), ``compare`` (several runs in one table), ``methods`` (what exists)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import bench, registry
from .errors import ConfigError, TokenReduceError

DEFAULT_MODEL = "zoo:digits-vit"
SWEEP_RATIOS = [0.25, 0.5, 0.75]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenreduce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.add_argument("--markdown", action="store_true", help="print a Markdown table (used for the README)")

    run = commands.add_parser("bench", help="measure methods against the unreduced model")
    run.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="zoo:NAME, timm:NAME, a Hub id or a local path (default: %(default)s)")
    run.add_argument("--method", nargs="+", default=[], help="method name(s); 'all' for every method supported by the model that takes one budget")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, nargs="+", default=[], help="reducible tokens kept (one or more budgets)")
    budget.add_argument("--ratio", type=float, nargs="+", default=[], help="fraction of reducible tokens removed")
    budget.add_argument(
        "--equivalent-tokens", type=int, nargs="+", default=[], metavar="T",
        help="visual tokens averaged over the LLM's layers: equivalent_tokens=T for in-LLM methods, keep=T for the others",
    )
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra config field, e.g. --set inflection=-1; METHOD.KEY=VALUE for one method, e.g. --set fastv.layer=1")
    run.add_argument("--sweep", action="store_true", help=f"every supported method that takes one budget, at ratios {SWEEP_RATIOS} unless --method/--keep/--ratio narrow it")
    run.add_argument("--samples", type=int, default=360, help="evaluation images (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate (interleaved)")
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    run.add_argument("--pretrained", action="store_true", help="timm models: load pretrained weights (needs them cached)")
    run.add_argument("--out", help="write the results as JSON")
    run.add_argument("--plot", help="write a Pareto plot (PNG) of quality against GFLOPs")
    run.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--steps", type=int, default=50, help="zoo:digits-dit: DDIM sampling steps (default: %(default)s)")
    run.add_argument("--guidance", type=float, default=2.0, help="zoo:digits-dit: classifier-free guidance scale (default: %(default)s)")
    run.add_argument("--grid", help="zoo:digits-dit: write an image grid (PNG), one row of samples per method")
    run.add_argument(
        "--fewer-steps", type=int, nargs="*", default=None, metavar="N",
        help="zoo:digits-dit: also sample uncached with N steps; without N, one step count per method matching its FLOPs",
    )

    viz = commands.add_parser("viz", help="save an image with each method's discarded patches greyed out")
    viz.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    viz.add_argument("--method", nargs="+", required=True, help="method name(s); 'all' for every method supported by the model")
    viz_budget = viz.add_mutually_exclusive_group(required=True)
    viz_budget.add_argument("--keep", type=int)
    viz_budget.add_argument("--ratio", type=float)
    viz.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    viz.add_argument("--sample", type=int, default=0, help="index of the evaluation input to draw (default: %(default)s)")
    viz.add_argument("--out", default="viz.png")

    compare = commands.add_parser("compare", help="one table from several `bench --out` files: accuracy by method and budget")
    compare.add_argument("results", nargs="+", help="JSON files written by `tokenreduce bench --out`")

    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            print(methods_table(markdown=args.markdown))
            return 0
        if args.command == "viz":
            return _viz(args)
        if args.command == "compare":
            print(bench.compare_table([(Path(path).stem, json.loads(Path(path).read_text())) for path in args.results]), end="")
            return 0
        return _bench(args)
    except (TokenReduceError, ValueError, OSError) as error:
        print(f"tokenreduce: error: {error}", file=sys.stderr)
        return 2


def methods_table(markdown: bool = False) -> str:
    """The registered methods and the model classes they apply to (generated, never kept by hand)."""
    configs = registry.method_configs()
    rows = [(cls.method, cls.__name__, registry.method_for_class(cls)) for cls in configs]
    if not markdown:
        width = max(len(m) for m, _, _ in rows)
        return "\n".join(f"{m.ljust(width)}  {c:<16} {method.description}" for m, c, method in rows)
    lines = ["| method | config | what it does |", "|---|---|---|"]
    lines += [f"| `{m}` | `{c}` | {method.description} |" for m, c, method in rows]
    lines += ["", "| model class | " + " | ".join(f"`{m}`" for m, _, _ in rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for path, adapter in sorted(registry.adapter_classes().items(), key=lambda item: item[0].rsplit(".", 1)[-1]):
        marks = ["yes" if method.pick_site(adapter.sites) is not None else "" for _, _, method in rows]
        lines.append(f"| `{path.rsplit('.', 1)[-1]}` | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    return extra


def _bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "zoo:digits-dit":
        from . import bench_dit

        return bench_dit.run_cli(args, _parse_sets(args.set))
    dtype = getattr(torch, args.dtype)
    target = bench.load_target(args.model, samples=args.samples, pretrained=args.pretrained, dtype=dtype)
    from .api import supported

    methods = args.method
    if methods == ["all"] or (args.sweep and not methods):
        methods = [m for m in supported(target.model) if bench.takes_budget(m)]
    if not methods:
        raise ValueError("give --method NAME (see `tokenreduce methods`) or --sweep")
    ratios = args.ratio or ([] if args.keep or args.equivalent_tokens else SWEEP_RATIOS if args.sweep else [])
    configs = bench.sweep_configs(methods, args.keep, ratios, _parse_sets(args.set), args.equivalent_tokens)
    progress = _progress(len(configs) + 1, disable=args.no_progress)
    skipped: list[str] = []
    rows = bench.run(target, configs, batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats, progress=progress,
                     skipped=skipped if len(configs) > 1 else None)
    print(f"{target.name}: {len(target.inputs)} samples, batch {args.batch_size}, {args.dtype}, latency = median of {args.repeats} interleaved runs")
    print(bench.format_table(rows, markdown=args.markdown))
    for reason in skipped:
        print(f"skipped: {reason}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(bench.rows_to_json(target, rows, skipped), f, indent=2)
    if args.plot:
        bench.plot_pareto(rows, args.plot, target.name)
    return 0


def _viz(args: argparse.Namespace) -> int:
    from . import api, viz

    target = bench.load_target(args.model, samples=args.sample + 1)
    drawable = [m for m in api.supported(target.model) if _keeps_patches(m)]
    methods = drawable if args.method == ["all"] else args.method
    refused = [m for m in methods if m in api.list_methods() and not _keeps_patches(m)]
    if refused:
        raise ValueError(
            f"{', '.join(refused)} reduce(s) inside the language model (or in stages), after the patch grid is gone, so there "
            f"is nothing to draw; methods viz draws on this model: {', '.join(drawable)}"
        )
    budget = {"keep": args.keep} if args.keep is not None else {"ratio": args.ratio}
    inputs = target.inputs[args.sample : args.sample + 1]
    pixels = target.pixels(inputs)
    image = viz.to_display(pixels[0])
    panels = [("input", image)]
    for name in methods:
        config = registry.config_class(name)(**budget, **_parse_sets(args.set))
        try:
            handle = api.apply(target.model, config)
        except ConfigError as error:
            if args.method != ["all"]:
                raise
            print(f"skipped: {error}")  # as bench does: one budget out of a method's reach does not stop the others
            continue
        with torch.inference_mode(), handle:
            encode = getattr(handle.adapter, "encode_images", None)
            encode(pixels) if encode is not None else target.logits(target.model, inputs)
            alive = handle.surviving_patches()
            grid = handle.method.facts["grid"]
        if alive is None:
            raise ValueError(f"{name} does not report which patches it kept")
        panels.append((f"{name} ({int(alive[0].sum())} kept)", viz.grey_out(image, alive[0], grid)))
    viz.save_panels(panels, args.out)
    print(f"wrote {args.out}")
    return 0


def _keeps_patches(method: str) -> bool:
    """Whether a method's reduction leaves a patch grid to draw: one acting before the LLM, in a single stage."""
    method_cls = registry.method_for_class(registry.config_class(method))
    return "llm" not in method_cls.sites and bench.takes_budget(method)


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    def wrap(items):
        return tqdm(items, total=total, desc="evaluating", disable=disable, file=sys.stderr)

    return wrap


if __name__ == "__main__":
    sys.exit(main())
