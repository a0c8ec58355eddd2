"""Measurement primitives: FLOPs, latency, peak memory and quality, in one run.

A token-reduction result is only credible if speed-up and quality loss are
measured together, against the unreduced model, with the same tools. These
utilities know nothing about models or methods; the harness composes them.
"""

from tokenreduce.measure.flops import FlopReport, count_flops, transformer_block_flops
from tokenreduce.measure.latency import Timing, speedup, time_interleaved
from tokenreduce.measure.memory import MemoryReport, peak_memory
from tokenreduce.measure.profiling import ModuleTimer, analyse_overhead, oversubscribed, parallel_op_probe, profile_calls
from tokenreduce.measure.quality import accuracy, kl_divergence, top1_agreement

__all__ = [
    "FlopReport",
    "MemoryReport",
    "ModuleTimer",
    "Timing",
    "accuracy",
    "analyse_overhead",
    "count_flops",
    "kl_divergence",
    "oversubscribed",
    "parallel_op_probe",
    "peak_memory",
    "profile_calls",
    "speedup",
    "time_interleaved",
    "top1_agreement",
    "transformer_block_flops",
]
