"""Bad input gets a clear error naming what was wrong and what is accepted; the model is left unchanged."""

from __future__ import annotations

import pytest
import timm
import torch
import vit_fixtures as fx

import tokenreduce as tr


@pytest.fixture(scope="module")
def model():
    return fx.build("hf_vit_cls")


@pytest.fixture(scope="module")
def reference(model):
    return fx.output(model, fx.images(2))


def assert_unchanged(model, reference):
    assert torch.equal(fx.output(model, fx.images(2)), reference)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert tr.remove(model) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: tr.ToMeConfig(ratio=-0.1), r"ratio=-0.1 is invalid.*\[0, 1\)"),
        (lambda: tr.ToMeConfig(ratio=1.0), r"ratio=1.0 is invalid"),
        (lambda: tr.RandomConfig(keep=-3), r"keep=-3 is invalid"),
        (lambda: tr.ToMeConfig(), r"give exactly one of r=\.\.\. or keep=\.\.\. or ratio=\.\.\."),
        (lambda: tr.ToMeConfig(r=4, keep=10), r"give exactly one"),
        (lambda: tr.ToMeConfig(r=2, inflection=3.0), r"inflection=3.0 is invalid"),
        (lambda: tr.EViTConfig(keep_rate=0.0), r"keep_rate=0.0 is invalid"),
        (lambda: tr.FiCoCoVConfig(keep=8, redundancy_axis="diag"), r"accepted: row, column"),
        (lambda: tr.ToMeConfig(r=2, layers=(3, 1)), r"strictly increasing"),
        (lambda: tr.config_from_dict({"method": "fastest"}), r"unknown method 'fastest'; available methods: tome, evit"),
        (lambda: tr.config_from_dict({"method": "tome", "r": 2, "speed": 9}), r"has no field\(s\) \['speed'\]"),
    ],
)
def test_invalid_configs(make, message):
    with pytest.raises(tr.ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    "config, message",
    [
        (tr.ToMeConfig(keep=65), r"keep=65 is larger than the 64 reducible tokens"),
        (tr.FiCoCoVConfig(keep=100), r"keep=100 is larger than the 64"),
        (tr.RandomConfig(keep=1000), r"keep=1000 is larger"),
        (tr.ToMeConfig(keep=1, layers=(0,)), r"cannot remove 63 of 64 tokens over 1 layers"),
        (tr.ToMeConfig(r=2, layers=(0, 9)), r"layers \[9\] out of range; this model has layers 0..3"),
        (tr.RandomConfig(keep=8, layer=4), r"layer \[4\] out of range"),
        (tr.FiCoCoVConfig(keep=8, start_layer=3, stop_layer=2), r"not a valid range"),
        (tr.PoolingConfig(keep=13), r"cannot pool a 8x8 grid to exactly 13 cells"),
    ],
)
def test_impossible_budgets_fail_before_the_model_is_touched(model, reference, config, message):
    with pytest.raises(tr.ConfigError, match=message):
        tr.apply(model, config)
    assert_unchanged(model, reference)


@pytest.mark.parametrize("config", [{"r": 8}, "tome", None, tr.ToMeConfig])
def test_wrong_config_type(model, reference, config):
    with pytest.raises(tr.ConfigError, match=r"expected a tokenreduce config instance.*available configs: ToMeConfig"):
        tr.apply(model, config)
    assert_unchanged(model, reference)


def test_unsupported_model_lists_supported_classes():
    with pytest.raises(tr.UnsupportedModelError, match=r"no adapter for Linear.*Supported model classes:.*ViTForImageClassification.*register_adapter"):
        tr.apply(torch.nn.Linear(4, 4), tr.ToMeConfig(r=1))


def test_not_a_module():
    class Pipeline:
        """Stands in for a pipeline object that is not an nn.Module."""

    with pytest.raises(tr.UnsupportedModelError, match=r"expects a torch.nn.Module.*got Pipeline"):
        tr.apply(Pipeline(), tr.ToMeConfig(r=1))


def test_model_without_vit_blocks():
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, block_fn=timm.models.vision_transformer.ResPostBlock
    )
    with pytest.raises(tr.UnsupportedModelError, match=r"block 0 is a ResPostBlock; .* supports Block blocks"):
        tr.apply(model, tr.ToMeConfig(r=1))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_runtime_keep_larger_than_a_smaller_input(model):
    """A budget valid for the configured resolution can be impossible for a smaller input: clear error."""
    timm_model = fx.build("timm_cls")
    timm_model.patch_embed.strict_img_size = False
    timm_model.dynamic_img_size = True
    timm_model.patch_embed.dynamic_img_pad = False
    timm_model.patch_embed.output_fmt = timm.layers.Format.NHWC
    timm_model.patch_embed.flatten = False
    with tr.apply(timm_model, tr.ToMeConfig(keep=40)):
        with pytest.raises(tr.ConfigError, match=r"keep=40 is larger than the 16 reducible tokens of this input"):
            timm_model(torch.randn(1, 3, 16, 16))
