"""The public API: apply / remove / Handle / registries / config serialisation."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import vit_fixtures as fx

import tokenreduce as tr
from tokenreduce import registry
from tokenreduce.adapters.vit import TIMM_BLOCK, TowerSpec, VitTowerAdapter


def test_public_names_are_few():
    assert len([name for name in tr.__all__ if not name.endswith("Config")]) <= 13


def test_list_methods_and_supported():
    assert tr.list_methods()[:6] == ["tome", "evit", "ficoco_v", "random", "uniform", "pooling"]
    assert tr.supported(fx.build("hf_clip")) == ["tome", "evit", "ficoco_v", "random", "uniform", "pooling"]
    assert tr.supported(torch.nn.Linear(2, 2)) == []


def test_context_manager_removes_and_stats_describe_last_forward():
    model = fx.build("timm_cls")
    pixels = fx.images(2)
    reference = model(pixels)
    with tr.apply(model, tr.ToMeConfig(r=4)) as handle:
        model(pixels)
        stats = handle.stats()
    assert not handle.active
    assert stats["method"] == "tome" and stats["forwards"] == 1
    assert stats["tokens_in"] == 65
    assert stats["removed_per_layer"] == [4, 4, 4, 4]
    assert stats["tokens_per_layer"] == [61, 57, 53, 49]
    assert torch.equal(model(pixels), reference)
    handle.remove()  # idempotent


def test_reset_clears_counters():
    model = fx.build("timm_cls")
    handle = tr.apply(model, tr.ToMeConfig(r=4))
    model(fx.images(1))
    handle.reset()
    assert handle.stats()["forwards"] == 0
    handle.remove()


def test_module_level_remove_finds_handles_from_parent():
    model = fx.build("hf_vit_cls")
    tr.apply(model, tr.FiCoCoVConfig(keep=32))
    assert tr.remove(model) == 1
    assert tr.remove(model) == 0
    tr.apply(model, tr.ToMeConfig(r=2)).remove()


def test_config_round_trip_through_json():
    for config in [tr.ToMeConfig(r=8, inflection=-1.0, layers=(0, 2)), tr.FiCoCoVConfig(keep=64, lam=0.5), tr.RandomConfig(ratio=0.5, seed=3)]:
        data = json.loads(json.dumps(config.to_dict()))
        assert data["method"] == config.method and data["version"] == 1
        assert tr.config_from_dict(data) == config


def test_configs_are_frozen():
    config = tr.ToMeConfig(r=8)
    with pytest.raises(AttributeError):
        config.r = 4


def test_register_adapter_for_a_new_class_and_mro_lookup(monkeypatch):
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))  # keep the global registry clean

    class MyViT(timm.models.vision_transformer.VisionTransformer):
        pass

    class SubViT(MyViT):
        pass

    model = SubViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    # Subclasses of a supported class are supported through the MRO.
    with tr.apply(model, tr.ToMeConfig(r=2)) as handle:
        model(fx.images(1))
    assert handle.stats()["tokens_out"] == 61

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SubViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(tr.UnsupportedModelError):
        tr.apply(Plain(), tr.ToMeConfig(r=2))

    @tr.register_adapter(Plain)
    class PlainAdapter(VitTowerAdapter):
        tower = TowerSpec("inner.blocks", TIMM_BLOCK, has_cls=True)

        @staticmethod
        def _tokens(model, spec):
            return VitTowerAdapter._tokens(model.inner, spec)

    plain = Plain().eval()
    with tr.apply(plain, tr.ToMeConfig(r=2)) as handle:
        plain(fx.images(1))
    assert handle.stats()["tokens_out"] == 61


def test_proportional_attention_bias_reaches_attention():
    model = fx.build("timm_cls")
    pixels = fx.images(2)
    with tr.apply(model, tr.ToMeConfig(r=8, prop_attn=True)):
        with_bias = model(pixels)
    with tr.apply(model, tr.ToMeConfig(r=8, prop_attn=False)):
        without = model(pixels)
    assert not torch.equal(with_bias, without)
