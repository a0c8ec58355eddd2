"""ToCa against METHODS.md D1: schedules, scores, probes that keep SDPA, CFG sharing, caches and stats."""

from __future__ import annotations

import dit_fixtures as fx
import pytest
import torch
from torch.overrides import TorchFunctionMode

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.diffusion import ToCaConfig
from tokenreduce.diffusion.method import BlockInfo, UnitCall, UnitSpec
from tokenreduce.diffusion.state import DiffusionRun
from tokenreduce.methods.toca import ToCa
from tokenreduce.methods.toca import method as toca_module


@pytest.fixture(scope="module")
def models():
    return {name: fx.build(name) for name in fx.NAMES}


def method_for(model, config) -> ToCa:
    return ToCa(config, registry.adapter_for(model)(model).describe())


def full_pattern(method: ToCa, num_steps: int) -> list[list[bool]]:
    """Per step, whether blocks 0 and 1 compute in full (block 1 stands for every block after the first)."""
    run = DiffusionRun(num_steps=lambda: num_steps, check_steps=method.check_steps)
    latents = torch.zeros(1, 4, 16, 16)
    pattern = []
    for t in torch.linspace(999, 0, num_steps).tolist():
        run.begin(t, latents, (8, 8), want_pairs=False)
        method.begin(run)
        pattern.append([method._is_full(run, layer) for layer in (0, 1)])
    return pattern


def steps_where(pattern, layer):
    return [step for step, full in enumerate(pattern) if full[layer]]


def test_pixart_full_steps_match_the_reference_schedule(models):
    """D1.6: 20 steps, N = 3: all layers full at 0, 6, 9, 12, 15, 18; layer 0 alone also at 4 (reference quirk)."""
    compat = full_pattern(method_for(models["pixart"], ToCaConfig(preset="pixart", num_steps=20, reference_compat=True)), 20)
    assert steps_where(compat, 0) == [0, 4, 6, 9, 12, 15, 18]
    assert steps_where(compat, 1) == [0, 6, 9, 12, 15, 18]
    library = full_pattern(method_for(models["pixart"], ToCaConfig(preset="pixart", num_steps=20)), 20)
    assert steps_where(library, 0) == steps_where(library, 1) == [0, 4, 6, 9, 12, 15, 18]  # decided once per forward


def test_dit_ddim50_full_steps_match_the_reference_schedule(models):
    """D1.6: all layers full at idx 49, 44, 40, 36, 30, 27, 24, 21, 18, 16, ..., 2, 0; layer 0 alone at 45 and 32."""
    pattern = full_pattern(method_for(models["dit"], ToCaConfig(preset="dit-ddim50", num_steps=50, reference_compat=True)), 50)
    all_layers = [49, 44, 40, 36, 30, 27, 24, 21, *range(18, -1, -2)]
    assert [49 - s for s in steps_where(pattern, 1)] == all_layers
    assert [49 - s for s in steps_where(pattern, 0)] == sorted([*all_layers, 45, 32], reverse=True)


def test_flux_full_steps_are_the_first_three_then_every_fourth(models):
    pattern = full_pattern(method_for(models["flux"], ToCaConfig(preset="flux")), 20)
    assert steps_where(pattern, 0) == [0, 1, 2, 6, 10, 14, 18]


def test_interval_one_is_always_full_even_with_the_dit_interval_scheduler(models):
    pattern = full_pattern(method_for(models["dit"], ToCaConfig(preset="dit-ddpm250", interval=1, num_steps=50)), 50)
    assert all(all(step) for step in pattern)


def ratio(method: ToCa, group: str, index: int, group_size: int, kind: str, step: int, num_steps: int) -> float:
    class Run:
        call = type("Call", (), {"step": step, "num_steps": num_steps})()

    block = BlockInfo(layer=index, group=group, index=index, group_size=group_size, num_layers=group_size)
    unit = UnitSpec("u", "u", kind, "img")
    return method.ratio(Run(), UnitCall(block, unit, torch.zeros(1, 1, 1), None, None, None, {}))


def test_fresh_ratio_schedules_follow_d15(models):
    pixart = method_for(models["pixart"], ToCaConfig(preset="pixart", num_steps=20, reference_compat=True))
    assert ratio(pixart, "blocks", 0, 28, "cross", 0, 20) == pytest.approx(0.30 * 1.6 * 1.9 * 0.6)
    assert ratio(pixart, "blocks", 27, 28, "mlp", 19, 20) == pytest.approx(0.30 * 0.4 * (1.9 - 1.8 * 19 / 20) * 1.6)
    assert ratio(pixart, "blocks", 5, 28, "self", 5, 20) == 0.0  # self-attention is reused whole
    ddim = method_for(models["dit"], ToCaConfig(preset="dit-ddim50", num_steps=50, reference_compat=True))
    assert ratio(ddim, "blocks", 0, 28, "mlp", 0, 50) == 0.0  # factor 3 - 4 * 49 / 50 < 0: no refresh early
    assert ratio(ddim, "blocks", 27, 28, "mlp", 49, 50) == pytest.approx(0.07 * 1.2 * 3.0 * 2.5)
    flux = method_for(models["flux"], ToCaConfig(preset="flux", reference_compat=True))
    assert ratio(flux, "single", 10, 38, "mlp", 7, 50) == pytest.approx(0.1 * (1.5 - 10 / 27) * 1.6)
    assert ratio(flux, "double", 10, 19, "mlp", 7, 50) == pytest.approx(0.1 * (1.5 - 10 / 27) * 0.4)
    library = method_for(models["flux"], ToCaConfig(preset="flux"))
    assert ratio(library, "double", 18, 19, "mlp", 7, 50) == pytest.approx(0.1 * 0.5 * 0.4)  # divisor L - 1 per stream


class Recorder(TorchFunctionMode):
    """Records SDPA inputs and the shapes of every softmax / matmul output."""

    def __init__(self):
        super().__init__()
        self.sdpa, self.shapes = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.scaled_dot_product_attention:
            kwargs = kwargs or {}
            q = args[0] if len(args) > 0 else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.sdpa.append((q.detach(), k.detach()))
        name = getattr(func, "__name__", "")
        if name in ("softmax", "matmul", "__matmul__", "bmm", "baddbmm", "einsum") and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("name", ["dit", "flux", "sd3"])
def test_s1_probe_equals_explicit_column_sums_and_no_eager_map_on_the_main_path(models, name, monkeypatch):
    """The main attention stays on SDPA; s1 (attention received) from the chunked probe equals the column sums
    of softmax(q k^T / sqrt(d)) built from the very q / k SDPA received; no L x L tensor is ever made."""
    monkeypatch.setattr(toca_module, "PROBE_CHUNK", 16)
    model = models[name]
    before = [m.processor for m in model.modules() if hasattr(m, "processor")]
    x, cond = fx.latents(name, 2), fx.condition(name, 2)
    with tr.apply(model, ToCaConfig(preset="constant", fresh_ratio=0.5)) as handle, Recorder() as recorder, torch.no_grad():
        fx.call(model, name, x, fx.timesteps(name, 4)[0], cond)
        store = handle._run.store
    assert [m.processor for m in model.modules() if hasattr(m, "processor")] == before
    main_calls = recorder.sdpa if name != "sd3" else recorder.sdpa[::2]  # SD3 block 0 also runs its dual attn2
    for layer, (q, k) in enumerate(main_calls):
        probs = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        expected = probs.sum(dim=2).mean(dim=1)
        s1 = store[("s1", layer)]
        got = torch.cat(list(s1.values()), dim=1)  # streams in the processor's order
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    tokens = main_calls[0][0].shape[2]
    assert not [s for s in recorder.shapes if len(s) >= 2 and s[-1] >= 64 and s[-2] >= 64]
    assert tokens >= 64


def test_cross_entropy_selection_is_shared_by_the_cfg_halves_and_masks_reach_the_probe(models, monkeypatch):
    chosen, top_rows = [], toca_module.top_rows

    def spy(score, k):
        chosen.append(top_rows(score, k))
        return chosen[-1]

    monkeypatch.setattr(toca_module, "top_rows", spy)
    model = models["pixart"]
    x, cond = fx.latents("pixart", 2), fx.condition("pixart", 2)
    with tr.apply(model, ToCaConfig(preset="pixart", num_steps=6)) as handle:
        fx.sample(model, "pixart", x, cond, steps=6, cfg="batched")
        maps = [v for k, v in handle._run.store.items() if isinstance(k, tuple) and k[0] == "s2"]
        stats = handle.stats()
    assert chosen and all(torch.equal(rows[:2], rows[2:]) for rows in chosen)  # [uncond, cond] halves
    assert maps and all(m[..., -2:].max() < 1e-3 for m in maps)  # padded prompt tokens get no attention
    assert stats["refreshed_tokens"] >= sum(rows.numel() for rows in chosen)  # plus units whose rho reached 1
    assert stats["full_steps"] + stats["partial_steps"] == 6 and stats["partial_steps"] > 0


def test_refreshed_tokens_and_cache_bytes_are_reported_in_the_model_dtype(models):
    """Constant preset, rho0 = 0.25, N = 2 over 4 steps: steps 1 and 3 refresh 16 of 64 MLP rows in each of 2 blocks."""
    model = fx.build("dit", torch.bfloat16)
    x, cond = fx.latents("dit", 1, dtype=torch.bfloat16), fx.condition("dit", 1)
    with tr.apply(model, ToCaConfig(preset="constant", fresh_ratio=0.25, interval=2)) as handle:
        fx.sample(model, "dit", x, cond, steps=4)
        stats = handle.stats()
        store = handle._run.store
    assert stats["full_steps"] == 2 and stats["partial_steps"] == 2
    assert stats["refreshed_tokens"] == 2 * 2 * 16
    outputs = [v for k, v in store.items() if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], int)]
    assert outputs and all(v.dtype == torch.bfloat16 for v in outputs)
    assert stats["cache_bytes"] >= sum(v.numel() * 2 for v in outputs)


def test_a_fresh_ratio_of_one_recomputes_everything_bit_for_bit(models):
    model = models["pixart"]
    x, cond = fx.latents("pixart", 2), fx.condition("pixart", 2)
    reference = fx.sample(model, "pixart", x, cond, steps=5, cfg="batched")
    with tr.apply(model, ToCaConfig(preset="constant", fresh_ratio=1.0, interval=4)) as handle:
        out = fx.sample(model, "pixart", x, cond, steps=5, cfg="batched")
        assert handle.stats()["partial_steps"] == 3
    assert torch.equal(out, reference)
