"""top1_agreement / kl_divergence / accuracy on hand-built logits."""

import math

import pytest
import torch

from tokenreduce.measure import accuracy, kl_divergence, top1_agreement

REFERENCE = torch.tensor(
    [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0], [1.0, 2.0, 3.0]]
)
# argmax: reference 0, 1, 2, 2; other 0, 1, 2, 0 -> 3 of 4 agree.
OTHER = torch.tensor([[2.0, 0.0, 0.0], [0.0, 9.0, 1.0], [0.0, 0.0, 0.1], [4.0, 2.0, 3.0]])


def test_top1_agreement():
    assert top1_agreement(REFERENCE, OTHER) == 0.75
    assert top1_agreement(REFERENCE, REFERENCE) == 1.0
    # Leading dimensions are flattened into rows.
    assert top1_agreement(REFERENCE.view(2, 2, 3), OTHER.view(2, 2, 3)) == 0.75


def test_kl_zero_for_identical_logits():
    assert kl_divergence(REFERENCE, REFERENCE.clone()) == 0.0
    # Shift invariance of softmax: same distributions, KL 0 up to float64 round-off.
    assert abs(kl_divergence(REFERENCE, REFERENCE + 7.0)) < 1e-12


def test_kl_two_class_hand_computed():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    p_logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    q_logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert kl_divergence(p_logits, q_logits) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    # Mean over rows: a second, identical row halves it.
    both_p = torch.cat([p_logits, p_logits])
    both_q = torch.cat([q_logits, p_logits])
    assert kl_divergence(both_p, both_q) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-12)


def test_kl_low_precision_inputs_and_masked_classes():
    p_logits = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16)
    q_logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float16)
    assert kl_divergence(p_logits, q_logits) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-3)
    # A class with zero reference probability contributes 0: p = (1, 0), q = (1/2, 1/2).
    masked = torch.tensor([[0.0, float("-inf")]])
    assert kl_divergence(masked, torch.zeros(1, 2)) == pytest.approx(math.log(2.0), abs=1e-12)


def test_accuracy():
    labels = torch.tensor([0, 1, 1, 2])  # reference argmax 0, 1, 2, 2
    assert accuracy(REFERENCE, labels) == 0.75
    assert accuracy(REFERENCE.view(2, 2, 3), labels.view(2, 2)) == 0.75


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        top1_agreement(REFERENCE, OTHER[:2])
    with pytest.raises(ValueError):
        kl_divergence(REFERENCE, OTHER[:, :2])
    with pytest.raises(ValueError):
        accuracy(REFERENCE, torch.tensor([0, 1]))
