"""Helpers the benchmark scripts share (the measuring itself lives in ``tokenreduce.measure``).

Imported as ``common``: running ``python benchmarks/<script>.py`` puts this folder
first on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from tokenreduce.measure import oversubscribed


def log(msg: str) -> None:
    """Progress on stderr, time-stamped, so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_results(path: str | None, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON to ``path`` (what JSON cannot hold as its text) and say so on stdout; nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"\nwrote {path}")


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Rows of already formatted cells as aligned columns; the first ``left`` columns left-aligned, the rest right."""
    lines = [list(head), *map(list, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    rule = "-" * len(fmt(lines[0]))
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def report_contention(probes: Sequence[dict[str, Any]]) -> None:
    """Print the parallel-op probe taken at the start and end of a run, and warn when the cores were oversubscribed.

    Under oversubscription each parallel ATen op waits a scheduler slice for its worker
    threads, so small ops (a reduction step's) cost far more than their work.
    """
    print("parallel-op probe (256k-element add, median ms) start/end: " + " / ".join(
        f"{p['median_ms_threads']:.2f} with {p['threads']} threads, {p['median_ms_1_thread']:.2f} with 1" for p in probes))
    if oversubscribed(probes):
        print("WARNING: the cores are oversubscribed by other processes: small parallel ops wait a scheduler slice each, "
              "which inflates the overhead figures (see benchmarks/README.md). Compare with --threads 1.")
