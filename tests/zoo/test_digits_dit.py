"""Fast checks of the shipped digits-dit model and its sampling/scoring helpers."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

import tokenreduce.zoo
from tokenreduce.zoo.digits import digits_split
from tokenreduce.zoo.dit_sampling import (
    NULL_CLASS,
    digits16,
    judge,
    make_scheduler,
    psnr,
    sample,
    ssim,
    to_digits_vit,
)

MODEL_DIR = Path(tokenreduce.zoo.__file__).parent / "digits_dit"

MIN_JUDGED_ACCURACY = 0.9
"""20 samples, 2 per class, DDIM-10, CFG 2.0: measured 20/20 for each of seeds
0-4 with the shipped weights and digits-vit judge. The two-sample margin
leaves room for CPU numerics and a retrained judge, while a broken model
(about 2/20 by chance) or broken guidance fails clearly."""


@pytest.fixture(scope="module")
def model() -> DiTTransformer2DModel:
    return DiTTransformer2DModel.from_pretrained(MODEL_DIR).eval()


def test_model_has_64_tokens_and_epsilon_output(model):
    config = model.config
    assert (config.sample_size, config.patch_size, config.in_channels) == (16, 2, 1)
    assert model.pos_embed(torch.zeros(1, 1, 16, 16)).shape[1] == 64
    assert model.out_channels == 1
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == NULL_CLASS + 1


def test_saved_scheduler_matches_make_scheduler():
    def public(config) -> dict:
        return {key: value for key, value in config.items() if not key.startswith("_")}

    assert public(DDIMScheduler.from_pretrained(MODEL_DIR).config) == public(make_scheduler().config)


def test_digits16_uses_the_digits_vit_split():
    images, labels = digits16("test")
    assert images.shape == (360, 1, 16, 16)
    assert images.min() == -1 and images.max() == 1
    assert torch.equal(labels, digits_split("test")[1])


def test_judge_sees_real_digits_as_digits_vit_prepares_them():
    images, _ = digits16("test")
    torch.testing.assert_close(to_digits_vit(images), digits_split("test")[0])


def test_sample_is_deterministic_for_fixed_noise(model):
    labels = torch.tensor([3, 7])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    first = sample(model, labels, steps=3, noise=noise)
    assert first.shape == (2, 1, 16, 16)
    assert torch.equal(first, sample(model, labels, steps=3, noise=noise))
    assert not torch.equal(first, sample(model, labels, steps=3, noise=noise, guidance=None))


def test_generated_digits_are_judged_as_their_class(model):
    labels = torch.arange(10).repeat_interleave(2)
    images = sample(model, labels, steps=10, guidance=2.0, generator=torch.Generator().manual_seed(0))
    accuracy = (judge(images) == labels).float().mean().item()
    assert accuracy >= MIN_JUDGED_ACCURACY


def test_psnr():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert psnr(x, x) == math.inf
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(2**2 / 0.1**2))


def test_ssim():
    x, y = (torch.rand(2, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).unbind()
    assert ssim(x, x) == pytest.approx(1.0)
    assert abs(ssim(x, y)) < 0.1


def test_ssim_matches_torchmetrics_on_mirrored_digits():
    # Reference: torchmetrics 1.9.0 structural_similarity_index_measure(
    # b.double(), a.double(), data_range=2.0), computed once; torchmetrics is
    # not a dependency.
    a = digits16("test")[0][:4]
    assert ssim(a, a.flip(-1)) == pytest.approx(0.18852718907066343, abs=1e-9)
