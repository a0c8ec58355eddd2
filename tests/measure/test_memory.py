"""peak_memory on CPU: the /proc high-water mark and the psutil fallback."""

import time

import pytest
import torch

from tokenreduce.measure import memory, peak_memory

MB = 1_000_000
ELEMENTS_200MB = 50_000_000  # float32


def allocate_200mb():
    x = torch.ones(ELEMENTS_200MB)  # ones, not empty: the pages must be touched
    assert x.nbytes == 200 * MB


def test_cpu_peak_sees_200mb_allocation():
    report = peak_memory(allocate_200mb)
    assert report.kind == "cpu_rss"
    assert report.delta_bytes >= 150 * MB
    assert report.delta_bytes == report.peak_bytes - report.baseline_bytes
    assert report.baseline_bytes > 0


def test_cpu_peak_of_noop_is_small():
    report = peak_memory(lambda: None, device=torch.device("cpu"))
    assert 0 <= report.delta_bytes < 16 * MB


def test_psutil_fallback_when_clear_refs_unwritable(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")

    def allocate_and_hold():
        x = torch.ones(ELEMENTS_200MB)
        time.sleep(0.05)  # give the sampler time to see it
        del x

    report = peak_memory(allocate_and_hold, "cpu")
    assert report.kind == "cpu_rss"
    assert report.delta_bytes >= 150 * MB


def test_rejects_unsupported_device():
    with pytest.raises(ValueError):
        peak_memory(lambda: None, "meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_sees_200mb_allocation():
    report = peak_memory(lambda: torch.ones(ELEMENTS_200MB, device="cuda"), "cuda")
    assert report.kind == "cuda_allocated"
    assert report.delta_bytes >= 200 * MB
