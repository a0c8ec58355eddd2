"""tr.apply on a pipeline or its transformer; bad input fails before the model is touched."""

from __future__ import annotations

import dit_fixtures as fx
import pytest
import vit_fixtures
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    Transformer2DModel,
    UNet2DModel,
)

import tokenreduce as tr
from tokenreduce.diffusion import (
    DeltaDiTConfig,
    FirstBlockCacheConfig,
    FORAConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
    ToCaConfig,
    ToMeDiTConfig,
)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32,
    ).eval()


@pytest.fixture(scope="module")
def dit_pipe():
    pipe = DiTPipeline(transformer=fx.build("dit"), vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart_pipe():
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=fx.build("pixart"), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_dit(pipe, steps=8):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images


def generate_pixart(pipe, steps=8):
    cond, uncond = fx.condition("pixart", 2), fx.null_condition("pixart", 2)
    return pipe(
        prompt_embeds=cond["encoder_hidden_states"], prompt_attention_mask=cond["encoder_attention_mask"],
        negative_prompt_embeds=uncond["encoder_hidden_states"], negative_prompt_attention_mask=uncond["encoder_attention_mask"],
        negative_prompt=None, num_inference_steps=steps, output_type="latent", use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0), height=32, width=32,
    ).images


PIPELINES = {"dit": ("dit_pipe", generate_dit), "pixart": ("pixart_pipe", generate_pixart)}


@pytest.mark.parametrize("name", list(PIPELINES))
@pytest.mark.parametrize(
    "zero, active",
    [
        (ToCaConfig(interval=1), ToCaConfig()),  # the preset needs the step count: read from the scheduler
        (FORAConfig(interval=1), FORAConfig()),
        (TeaCacheConfig(threshold=0.0), TeaCacheConfig(threshold=0.5)),
    ],
    ids=["toca", "fora", "teacache"],
)
def test_apply_to_a_pipeline_and_remove_it_from_the_pipeline(request, name, zero, active):
    fixture, generate = PIPELINES[name]
    pipe = request.getfixturevalue(fixture)
    reference = generate(pipe)
    with tr.apply(pipe, zero):
        assert torch.equal(generate(pipe), reference)
    handle = tr.apply(pipe, active)
    out = generate(pipe, steps=8)
    stats = handle.stats()
    generate(pipe, steps=5)  # the next generation reads the new step count
    assert handle.stats()["steps"] == 5
    assert tr.remove(pipe) == 1 and not handle.active
    assert stats["model"] == type(pipe).__name__ and stats["steps"] == 8 and stats["generations"] == 1
    assert stats["partial_steps"] > 0 and torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(generate(pipe), reference)


def test_pipeline_and_its_transformer_are_one_target(dit_pipe):
    with tr.apply(dit_pipe.transformer, FORAConfig()):
        with pytest.raises(tr.AlreadyAppliedError):
            tr.apply(dit_pipe, FORAConfig())
    assert "fora" in tr.supported(dit_pipe) and "toca" in tr.supported(dit_pipe.transformer)


def assert_untouched(model, before):
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert tr.remove(model) == 0
    x, cond = fx.latents("dit", 1), fx.condition("dit", 1)
    assert torch.equal(fx.sample(model, "dit", x, cond, steps=2), before)


@pytest.fixture(scope="module")
def dit():
    return fx.build("dit")


@pytest.fixture(scope="module")
def dit_reference(dit):
    return fx.sample(dit, "dit", fx.latents("dit", 1), fx.condition("dit", 1), steps=2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ToCaConfig(fresh_ratio=0.0), r"fresh_ratio=0.0 is invalid; expected a number in \(0.0, 1.0\]"),
        (lambda: ToCaConfig(fresh_ratio=1.5), r"fresh_ratio=1.5 is invalid"),
        (lambda: ToCaConfig(interval=0), r"interval=0 is invalid; expected an int >= 1"),
        (lambda: ToCaConfig(preset="sdxl"), r"preset='sdxl' is invalid; accepted: auto, pixart, dit-ddpm250, dit-ddim50, flux, constant"),
        (lambda: FORAConfig(interval=0), r"interval=0 is invalid"),
        (lambda: FORAConfig(interval=2.5), r"interval=2.5 is invalid"),
        (lambda: TaylorSeerConfig(order=-1), r"order=-1 is invalid"),
        (lambda: TeaCacheConfig(threshold=-1.0), r"threshold=-1.0 is invalid"),
        (lambda: TeaCacheConfig(coefficients=()), r"coefficients=\(\) is invalid"),
        (lambda: FirstBlockCacheConfig(threshold=-0.1), r"threshold=-0.1 is invalid"),
        (lambda: DeltaDiTConfig(boundary=1.5), r"boundary=1.5 is invalid"),
        (lambda: ToMeDiTConfig(ratio=1.0), r"ratio=1.0 is invalid"),
    ],
)
def test_invalid_configs(make, message):
    with pytest.raises(tr.ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "config, error, message",
    [
        (ToCaConfig(preset="dit-ddim50"), tr.ConfigError, r"depends on the number of inference steps; apply it to the pipeline .* or pass num_steps"),
        (ToCaConfig(preset="flux", num_steps=3), tr.ConfigError, r"runs 3 inference steps but this schedule needs at least 4"),
        (ToCaConfig(score="cross_entropy", num_steps=8), tr.ConfigError, r"score='cross_entropy' needs cross-attention.*use score='self_attn'"),
        (TaylorSeerConfig(warmup=4, interval=2), tr.ConfigError, None),  # fine on a bare transformer: no step count to check
        (DeltaDiTConfig(blocks=3, num_steps=8), tr.ConfigError, r"blocks=3 but DiTTransformer2DModel has 2 blocks; use 1..2"),
    ],
)
def test_impossible_settings_fail_before_the_model_is_touched(dit, dit_reference, config, error, message):
    if message is None:
        tr.apply(dit, config).remove()
    else:
        with pytest.raises(error, match=message):
            tr.apply(dit, config)
    assert_untouched(dit, dit_reference)


def test_a_scheduler_with_too_few_steps_is_refused_at_apply_and_at_generation(dit_pipe):
    dit_pipe.scheduler.set_timesteps(3)
    with pytest.raises(tr.ConfigError, match=r"the scheduler runs 3 inference steps but this schedule needs at least 4"):
        tr.apply(dit_pipe, TaylorSeerConfig(warmup=3, interval=2))
    assert tr.remove(dit_pipe) == 0
    dit_pipe.scheduler.set_timesteps(10)
    with tr.apply(dit_pipe, TaylorSeerConfig(warmup=3, interval=2)):
        with pytest.raises(tr.ConfigError, match=r"runs 2 inference steps but this schedule needs at least 4"):
            generate_dit(dit_pipe, steps=2)


def test_unsupported_models_are_refused_with_what_is_supported(dit, dit_reference):
    torch.manual_seed(0)
    generic = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10)
    with pytest.raises(tr.UnsupportedModelError, match=r"no adapter for Transformer2DModel.*DiTTransformer2DModel.*FluxTransformer2DModel.*PixArtTransformer2DModel.*SD3Transformer2DModel"):
        tr.apply(generic, FORAConfig())
    assert all("forward" not in m.__dict__ for m in generic.modules())
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(tr.UnsupportedModelError, match=r"DDPMPipeline has no `transformer` component.*supported transformers: DiTTransformer2DModel"):
        tr.apply(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), FORAConfig())
    with pytest.raises(tr.UnsupportedModelError, match=r"tome_dit cannot merge FluxTransformer2DModel's tokens.*supported: DiTTransformer2DModel"):
        tr.apply(fx.build("flux"), ToMeDiTConfig())
    with pytest.raises(tr.UnsupportedModelError, match=r"fora acts on \['dit'\] sites but VisionTransformer offers \['vit'\]"):
        tr.apply(vit_fixtures.build("timm_cls"), FORAConfig())
    assert_untouched(dit, dit_reference)
