"""Quality regression on the shipped digits-vit (DESIGN.md sec. 7: zoo models with thresholds).

Thresholds were set from measurement (see the README's quality table, produced by
`tokenreduce bench zoo:digits-vit --sweep`), with a margin for float noise only.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce import zoo
from tokenreduce.measure import accuracy


@pytest.fixture(scope="module")
def digits():
    model = zoo.load_model("digits-vit")
    pixels, labels = zoo.load_eval_data("digits-vit", "test")
    with torch.inference_mode():
        base = accuracy(model(pixel_values=pixels).logits, labels)
    return model, pixels, labels, base


def reduced_accuracy(digits, config) -> float:
    model, pixels, labels, _ = digits
    with tr.apply(model, config), torch.inference_mode():
        return accuracy(model(pixel_values=pixels).logits, labels)


def test_tome_at_half_the_tokens_keeps_accuracy_within_two_points(digits):
    assert reduced_accuracy(digits, tr.ToMeConfig(ratio=0.5)) >= digits[3] - 0.02


# Measured on the 360 test digits (base 100.0 %); the bound is the measurement minus one point.
MEASURED = {
    (0.5, "evit"): 0.9944, (0.5, "ficoco_v"): 1.0, (0.5, "random"): 0.9528, (0.5, "uniform"): 0.9778, (0.5, "pooling"): 0.9944,
    (0.75, "tome"): 0.9972, (0.75, "evit"): 0.9778, (0.75, "ficoco_v"): 1.0, (0.75, "random"): 0.8583,
    (0.75, "uniform"): 0.8278, (0.75, "pooling"): 0.925,
}


@pytest.mark.parametrize("ratio, method", list(MEASURED))
def test_accuracy_does_not_regress(digits, ratio, method):
    assert reduced_accuracy(digits, tr.config_from_dict({"method": method, "ratio": ratio})) >= MEASURED[ratio, method] - 0.01
