"""Quality of a reduced model, measured against the unreduced one.

Task accuracy alone is a coarse and noisy signal on small evaluation sets, and it
needs labels. Comparing the reduced model's logits with the unreduced model's on
the same inputs isolates exactly what the reduction changed: top-1 agreement says
how often the decision flips, and the KL divergence how far the whole predictive
distribution moved, even when the decision does not.

Every function takes logits of shape ``(..., C)``; all leading dimensions are
flattened into rows (samples, or tokens of a language model), and each result is
a mean over rows, returned as a Python float.
"""

from __future__ import annotations

import torch

__all__ = ["accuracy", "kl_divergence", "top1_agreement"]


def _check_pair(reference_logits: torch.Tensor, logits: torch.Tensor) -> None:
    if reference_logits.shape != logits.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} differs from reference "
            f"{tuple(reference_logits.shape)}"
        )
    if reference_logits.ndim == 0 or reference_logits.numel() == 0:
        raise ValueError(f"need non-empty logits of shape (..., C), got {tuple(logits.shape)}")


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the reference's argmax (1.0 = no decision changed)."""
    _check_pair(reference_logits, logits)
    logits = logits.to(reference_logits.device)
    agree = reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)
    return agree.double().mean().item()


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of ``KL(softmax(reference) || softmax(logits))``, in nats.

    The reference is the first argument because it is the distribution we want to
    preserve: the divergence weighs each class by the reference's probability.
    Computed in float64 from ``log_softmax`` (never ``log(softmax)``), because the
    reduced and unreduced logits are often very close and half-precision or float32
    round-off would otherwise dominate, or even make the result negative. Classes
    with zero reference probability (``-inf`` logits) contribute 0, by the
    convention ``0 * log 0 = 0``.
    """
    _check_pair(reference_logits, logits)
    ref_log_p = torch.log_softmax(reference_logits.to(torch.float64), dim=-1)
    log_q = torch.log_softmax(logits.to(reference_logits.device, torch.float64), dim=-1)
    ref_p = ref_log_p.exp()
    terms = torch.where(ref_p > 0, ref_p * (ref_log_p - log_q), 0.0)
    return terms.sum(dim=-1).mean().item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the integer label; ``labels`` has shape ``logits.shape[:-1]``."""
    if logits.ndim == 0 or logits.numel() == 0 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"need logits (..., C) and labels (...), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    correct = logits.argmax(dim=-1) == labels.to(logits.device)
    return correct.double().mean().item()
