"""On a GPU (skipped without one): the contract's core on CUDA in fp32 and bf16, and the s1 probe.

CUDA runs SDPA on flash / memory-efficient kernels and keeps every cache and
score on the device; these checks catch host / device mix-ups the CPU suite cannot.
"""

from __future__ import annotations

import dit_fixtures as fx
import pytest
import torch
from test_diffusion_contract import CASES, UNSUPPORTED
from test_toca import Recorder

import tokenreduce as tr
from tokenreduce.diffusion import ToCaConfig
from tokenreduce.methods.toca import method as toca_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", fx.NAMES)
def test_every_method_on_cuda(name, dtype):
    model = fx.build(name, dtype).cuda()
    x, cond = fx.latents(name, 2, dtype=dtype).cuda(), fx.to(fx.condition(name, 2, dtype=dtype), "cuda")
    reference = fx.sample(model, name, x, cond, cfg="batched")
    for case, (zero, active) in CASES.items():
        if (case, name) in UNSUPPORTED:
            continue
        with tr.apply(model, zero):
            assert torch.equal(fx.sample(model, name, x, cond, cfg="batched"), reference), case
        with tr.apply(model, active) as handle:
            out = fx.sample(model, name, x, cond, cfg="batched")
            stats = handle.stats()
        assert out.is_cuda and torch.isfinite(out.float()).all() and not torch.equal(out, reference), case
        assert stats["forwards"] == 6, case
    assert torch.equal(fx.sample(model, name, x, cond, cfg="batched"), reference)


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_s1_probe_on_cuda(name, monkeypatch):
    monkeypatch.setattr(toca_module, "PROBE_CHUNK", 16)
    model = fx.build(name).cuda()
    x, cond = fx.latents(name, 2).cuda(), fx.to(fx.condition(name, 2), "cuda")
    with tr.apply(model, ToCaConfig(preset="constant", fresh_ratio=0.5)) as handle, Recorder() as recorder, torch.no_grad():
        fx.call(model, name, x, fx.timesteps(name, 4)[0], cond)
        store = handle._run.store
    for layer, (q, k) in enumerate(recorder.sdpa):
        expected = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1).sum(dim=2).mean(dim=1)
        torch.testing.assert_close(torch.cat(list(store[("s1", layer)].values()), dim=1), expected, rtol=1e-4, atol=1e-4)
    assert not [s for s in recorder.shapes if len(s) >= 2 and s[-1] >= 64 and s[-2] >= 64]
