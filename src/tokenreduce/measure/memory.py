"""Peak memory of one call, on CUDA or on a Linux CPU.

Token reduction shrinks activations (and attention matrices quadratically), so
peak memory is one of the numbers it has to report. What "peak" means depends on
the device, and the two kinds are not comparable with each other:

* ``"cuda_allocated"``: the peak of ``torch.cuda.max_memory_allocated`` during the
  call, i.e. bytes held by live tensors. It excludes what the caching allocator
  has reserved but not handed out (fragmentation, freed blocks kept for reuse),
  the CUDA context, and memory libraries allocate outside PyTorch's allocator.
  It is precise and repeatable.
* ``"cpu_rss"``: the peak resident set size of the whole *process*. Linux lets a
  process reset its high-water mark (writing ``"5"`` to ``/proc/self/clear_refs``)
  and read it back (``VmHWM`` in ``/proc/self/status``), which catches even very
  short spikes. Where that file is not writable, RSS is sampled by a background
  thread with psutil, which can miss spikes shorter than the sampling interval or
  than the time ``fn`` holds the GIL without releasing it.

RSS caveats: it counts every thread of the process (a data loader, another model),
not just ``fn``'s tensors; it counts pages, so memory that was allocated but never
touched does not show up; and it includes memory the allocator (glibc malloc,
oneDNN, ...) keeps cached after it was freed. That caching works both ways: a
previous call's freed-but-cached memory raises ``baseline_bytes``, and ``fn`` may
reuse it without raising RSS, so ``delta_bytes`` can *under*-estimate. Large
tensors (above glibc's mmap threshold, at most 32 MiB) are returned to the OS
when freed, so they are measured reliably; compare candidates in the same
process state, and prefer large batch sizes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

__all__ = ["MemoryReport", "peak_memory"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
# Sampling period of the psutil fallback, in seconds.
_SAMPLE_INTERVAL_S = 1e-3


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Peak memory of one call, in bytes; ``kind`` says what was measured (see module doc).

    ``baseline_bytes`` is the memory in use just before the call, ``peak_bytes`` the
    highest value during it, and ``delta_bytes = peak_bytes - baseline_bytes`` what
    the call added on top: the number to compare between candidates.
    """

    peak_bytes: int
    baseline_bytes: int
    kind: Literal["cuda_allocated", "cpu_rss"]
    delta_bytes: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta_bytes", self.peak_bytes - self.baseline_bytes)


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> MemoryReport:
    """Run ``fn()`` once and report the peak memory on ``device`` ("cpu" or "cuda[:i]")."""
    device = torch.device(device)
    if device.type == "cuda":
        return _peak_cuda(fn, device)
    if device.type == "cpu":
        try:
            _reset_peak_rss()
        except OSError:
            return _peak_rss_sampled(fn)
        return _peak_rss_hwm(fn)
    raise ValueError(f"peak_memory supports 'cpu' and 'cuda' devices, got {device}")


def _peak_cuda(fn: Callable[[], Any], device: torch.device) -> MemoryReport:
    """Peak of live-tensor bytes on ``device``; synchronised so that queued kernels count."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return MemoryReport(peak_bytes=peak, baseline_bytes=baseline, kind="cuda_allocated")


def _reset_peak_rss() -> None:
    """Reset the process's RSS high-water mark (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    _CLEAR_REFS.write_text("5")


def _status_bytes(field: str) -> int:
    """Read a ``kB`` field such as ``VmRSS`` or ``VmHWM`` from ``/proc/self/status``."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in {_STATUS}")


def _peak_rss_hwm(fn: Callable[[], Any]) -> MemoryReport:
    """Exact peak RSS of ``fn`` via the kernel's high-water mark (already reset)."""
    baseline = _status_bytes("VmRSS")
    fn()
    peak = _status_bytes("VmHWM")
    return MemoryReport(peak_bytes=peak, baseline_bytes=baseline, kind="cpu_rss")


def _peak_rss_sampled(fn: Callable[[], Any]) -> MemoryReport:
    """Peak RSS of ``fn`` by sampling with psutil in a thread (may miss short spikes)."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, process.memory_info().rss)
            if stop.wait(_SAMPLE_INTERVAL_S):
                return

    sampler = threading.Thread(target=sample, name="tokenreduce-rss-sampler", daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return MemoryReport(peak_bytes=peak, baseline_bytes=baseline, kind="cpu_rss")
