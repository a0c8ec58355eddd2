"""Where the time of a forward goes: module wall times, tokenreduce's own overhead, and machine contention.

Three tools the benchmarks share (they grew in ``benchmarks/bench_tome_vit.py``):

* :class:`ModuleTimer`: wall time of chosen modules in every forward (two
  ``perf_counter`` calls per module call, via forward hooks), so that a measured
  speed-up can be split into the parts whose FLOPs shrank and the parts that did not.
* :func:`profile_calls` + :func:`analyse_overhead`: ``torch.profiler`` runs of a
  forward, reduced to per-forward numbers. The overhead of a token-reduction method
  is the time spent in the ``tokenreduce.reduce`` ranges
  (:data:`tokenreduce.merge_slot.OVERHEAD_LABEL`, scoring + merging), self and
  children; the same profile gives an op-by-op breakdown of that range and of the
  whole forward.
* :func:`parallel_op_probe`: the latency of one small parallel ATen op. On a shared
  machine whose cores are oversubscribed, every parallel region waits a scheduler
  slice for its worker threads, whatever its size; the probe tells a reader whether
  the overhead figures were taken under such contention.

Like the rest of :mod:`tokenreduce.measure`, nothing here knows about models or
methods beyond the profiler label.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..merge_slot import OVERHEAD_LABEL

__all__ = ["ModuleTimer", "analyse_overhead", "oversubscribed", "parallel_op_probe", "profile_calls"]


class ModuleTimer:
    """Wall time of every call of some modules, grouped per forward (forward pre/post hooks).

    ``modules`` maps a name to a module. A new forward starts whenever the *first*
    module of the mapping is entered, so list first a module that runs once per
    forward before the others. ``forwards[i][name]`` is the summed wall time of
    ``name``'s calls in forward ``i`` (modules may nest: each has its own clock).
    Hooks cost two ``perf_counter`` calls per module call, negligible next to a block.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.names = list(modules)
        self.forwards: list[dict[str, float]] = []
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []
        for index, (name, module) in enumerate(modules.items()):
            self._handles.append(module.register_forward_pre_hook(self._pre(name, index == 0)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str, first: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if first:
                self.forwards.append(dict.fromkeys(self.names, 0.0))
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            self.forwards[-1][name] += time.perf_counter() - self._start[name]

        return hook

    def last(self, count: int) -> list[dict[str, float]]:
        """The last ``count`` forwards (e.g. the timed ones, after the warm-up)."""
        return self.forwards[-count:] if count else []

    def medians(self, count: int) -> dict[str, float]:
        """Median seconds per module over the last ``count`` forwards."""
        timed = self.last(count)
        return {name: statistics.median(f[name] for f in timed) for name in self.names}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def profile_calls(fn: Callable[[], Any], n: int) -> tuple[Any, float]:
    """Run ``fn`` ``n`` times under ``torch.profiler`` (CPU activity); return the profile and the wall seconds."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        wall = time.perf_counter() - start
    return prof, wall


def _inside_label(event: Any, label: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == label:
            return True
        parent = parent.cpu_parent
    return False


def analyse_overhead(prof: Any, n: int, reduce_layers: list[int] | None = None, label: str = OVERHEAD_LABEL) -> dict[str, Any]:
    """Per-call numbers (ms) from a profile of ``n`` calls: whole call by self time, the ``label`` ranges, SDPA kernels.

    ``reduce_layers`` marks (non-zero entries) the layers whose reduction range runs in
    every call, in order (ToMe's schedule; ``[1]`` for a method that reduces once).
    With it, the range time is attributed per layer, and a contention-robust estimate
    is made: the reduction runs the same op sequence in every call, so per layer and
    per op position the fastest of the ``n`` calls is kept. A thread preempted by
    another tenant inflates one call by a scheduler slice (several ms); the minimum
    over calls filters that out (it does not filter systematic waits).

    Returned keys: ``self_ms`` / ``counts`` (per op name, per call), ``reduce_ms``
    (range total, self + children), ``reduce_ranges_per_forward``, ``reduce_self_ms``
    (Python glue inside the range), ``inside_ms`` / ``inside_calls_per_forward`` (ops
    inside the range), ``reduce_per_layer_ms``, ``reduce_min_over_forwards_ms``,
    ``sdpa_calls_per_forward``, ``table`` (``key_averages`` as text).
    """
    averages = prof.key_averages()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / n for e in averages}
    counts = {e.key: e.count / n for e in averages}
    reduce_total = next((e.cpu_time_total / 1e3 / n for e in averages if e.key == label), 0.0)
    reduce_count = next((e.count / n for e in averages if e.key == label), 0)

    inside: dict[str, float] = defaultdict(float)
    inside_count: dict[str, int] = defaultdict(int)
    ranges: list[tuple[float, float, list[float]]] = []
    for ev in prof.events():
        if ev.name == label:
            children = sorted(ev.cpu_children, key=lambda c: c.time_range.start)
            ranges.append((ev.time_range.start, ev.cpu_time_total / 1e3, [c.cpu_time_total / 1e3 for c in children]))
        elif _inside_label(ev, label):
            inside[ev.name] += ev.self_cpu_time_total / 1e3 / n
            inside_count[ev.name] += 1
    ranges.sort(key=lambda t: t[0])
    per_layer: list[float] | None = None
    robust: float | None = None
    layers = [i for i, k in enumerate(reduce_layers or []) if k]
    if layers and ranges:
        acc = [0.0] * len(reduce_layers)
        for j, (_, ms, _) in enumerate(ranges):
            acc[layers[j % len(layers)]] += ms / n
        per_layer = acc
        by_layer: dict[int, list[list[float]]] = defaultdict(list)
        for j, (_, ms, children) in enumerate(ranges):
            by_layer[j % len(layers)].append([ms - sum(children)] + children)
        robust = 0.0
        for runs in by_layer.values():
            if len({len(run) for run in runs}) == 1:
                robust += sum(min(col) for col in zip(*runs))
            else:
                robust += min(sum(run) for run in runs)
    range_self = next((e.self_cpu_time_total / 1e3 / n for e in averages if e.key == label), 0.0)
    return {
        "self_ms": self_ms,
        "counts": counts,
        "reduce_ms": reduce_total,
        "reduce_ranges_per_forward": reduce_count,
        "reduce_self_ms": range_self,
        "inside_ms": dict(inside),
        "inside_calls_per_forward": {k: v / n for k, v in inside_count.items()},
        "reduce_per_layer_ms": per_layer,
        "reduce_min_over_forwards_ms": robust,
        "sdpa_calls_per_forward": {k: counts[k] for k in counts if "scaled_dot_product" in k},
        "table": averages.table(sort_by="self_cpu_time_total", row_limit=25),
    }


def parallel_op_probe(threads: int, calls: int = 21) -> dict[str, float]:
    """Median ms of one small *parallel* ATen op (256k-element add) with ``threads`` and with 1 thread.

    On a quiet machine both are ~0.05 ms. When the cores are oversubscribed (other
    processes), every parallel region waits for its worker threads to be scheduled,
    which costs a scheduler slice (several ms) per op, independent of the op's size.
    Many small parallel ops (such as a reduction step's) then cost far more than
    their work.
    """
    x = torch.randn(1 << 18)

    def median_ms() -> float:
        x.add(1.0)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            x.add(1.0)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    multi = median_ms()
    torch.set_num_threads(1)
    single = median_ms()
    torch.set_num_threads(previous)
    return {"threads": threads, "median_ms_threads": multi, "median_ms_1_thread": single}


OVERSUBSCRIBED_MS = 1.0  # a 256k-element add takes ~0.05 ms; a scheduler slice is several ms


def oversubscribed(probes: list[dict[str, float]]) -> bool:
    """Whether any :func:`parallel_op_probe` with more than one thread waited for its workers (see its doc)."""
    return any(p["threads"] > 1 and p["median_ms_threads"] > OVERSUBSCRIBED_MS for p in probes)
