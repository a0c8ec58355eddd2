"""FLOP counting that does not silently drop attention on CPU.

Token reduction trades FLOPs for quality, so the FLOP number we report has to
include *all* the work whose size depends on the token count. The quadratic part
of that work is attention, and that is exactly the part PyTorch's
:class:`~torch.utils.flop_counter.FlopCounterMode` misses on CPU:
``F.scaled_dot_product_attention`` dispatches there to
``aten._scaled_dot_product_flash_attention_for_cpu`` (with or without a float or
boolean ``attn_mask``, with ``is_causal`` and with ``enable_gqa``), which has no
registered FLOP formula and therefore counts 0. Its backward,
``aten._scaled_dot_product_flash_attention_for_cpu_backward``, counts 0 as well.
:func:`count_flops` registers formulas for both through ``custom_mapping``.

Nothing is counted twice: when SDPA falls back to the math implementation
(on CPU when ``dropout_p > 0`` or when the value head dim differs from the
query/key head dim; on the ``meta`` device always), the fallback
``aten._scaled_dot_product_attention_math`` is a composite op that decomposes into
``aten.bmm`` before the counter sees it, and ``bmm`` already has a formula in
torch. That path therefore needs no registration, and gets none.

Convention: one FLOP is one floating-point multiply or add, so a multiply-accumulate
(MAC) is 2 FLOPs and a ``(m, k) @ (k, n)`` product is ``2*m*k*n`` FLOPs. This is
torch's own convention and the one used by :func:`transformer_block_flops`. Only
matrix products (linear layers, convolutions, attention) are counted; norms,
softmax, activations and bias additions are not.

Formulas only look at shapes, so counting also works on the ``meta`` device: move
the model with ``model.to("meta")``, feed ``meta`` inputs, and shapes far larger
than the machine's memory can be counted without allocating anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopReport", "count_flops", "transformer_block_flops"]


@dataclasses.dataclass(frozen=True)
class FlopReport:
    """FLOPs (2 x MACs) of one call, in total and per module.

    ``by_module`` maps every module path reported by ``FlopCounterMode`` (e.g.
    ``"Global"``, ``"VisionTransformer"``, ``"VisionTransformer.blocks.0"``) to the
    FLOPs of all ops that ran while that module was active. Paths are nested, so a
    parent's value includes its children's: sum sibling paths, never a path and its
    ancestors. ``"Global"`` equals ``total``.
    """

    total: int
    by_module: dict[str, int]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu`` (forward).

    Same signature as torch's ``sdpa_flop`` for the CUDA SDPA ops (tensor args
    arrive as shapes). ``Q K^T`` is ``2*B*H*Lq*Lk*d_qk`` and ``P V`` is
    ``2*B*H*Lq*Lk*d_v``. ``H`` is the number of *query* heads: with grouped-query
    attention the K/V heads are broadcast, and every query head does the full work.
    Like torch's formulas this is the dense count; causal or other masks are not
    subtracted (the kernel's work is not reduced by a float mask either).
    """
    batch, heads, len_q, d_qk = query_shape
    len_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * batch * heads * len_q * len_k * d_qk + 2 * batch * heads * len_q * len_k * d_v


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """FLOPs of ``_scaled_dot_product_flash_attention_for_cpu_backward``.

    Same signature and the same five matrix products as torch's
    ``sdpa_backward_flop`` for the CUDA ops: recompute ``Q K^T`` (``d_qk``), then
    ``dP = dO V^T`` (``d_v``), ``dV = P^T dO`` (``d_v``), ``dQ = dS K`` (``d_qk``)
    and ``dK = dS^T Q`` (``d_qk``), each ``2*B*H*Lq*Lk*d`` FLOPs.
    """
    batch, heads, len_q, d_qk = query_shape
    len_k = key_shape[-2]
    d_v = value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (3 * d_qk + 2 * d_v)


_aten = torch.ops.aten

# The SDPA ops that run on CPU and have no formula in torch. If a future torch
# registers its own, these entries override it (one formula per op), so the count
# stays single.
_CPU_SDPA_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> FlopReport:
    """Run ``fn()`` once and return the FLOPs (2 x MACs) of everything it executed.

    The count is analytic (from op shapes), not measured, so it is deterministic and
    identical across machines and devices; use
    :func:`tokenreduce.measure.latency.time_interleaved` for speed.
    ``fn`` runs as given: wrap the model call in ``torch.no_grad()`` inside ``fn``
    if autograd is not wanted, and a backward pass inside ``fn`` is counted too.
    On CPU, ``F.scaled_dot_product_attention`` is counted with the same formula
    torch uses for the CUDA kernels (see the module docstring for why this needs a
    custom mapping). Works on the ``meta`` device.
    """
    with FlopCounterMode(display=False, custom_mapping=dict(_CPU_SDPA_FORMULAS)) as counter:
        fn()
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return FlopReport(total=counter.get_total_flops(), by_module=by_module)


def transformer_block_flops(
    n_tokens: int,
    dim: int,
    mlp_dim: int,
    n_kv_heads_ratio: float | Fraction = 1.0,
    mlp_matrices: int = 2,
    attention_dim: int | None = None,
) -> int:
    """Analytic FLOPs (2 x MACs) of one transformer block on ``n_tokens`` tokens.

    ``2 * (QKVO + attention + MLP)`` MACs with

    * QKVO: ``4*n*d^2``; with grouped-query attention the K and V projections shrink
      to ``d * (ratio*d)``, giving ``2*n*d^2 + 2*n*d^2*ratio``;
    * attention: ``2*n^2*d`` (``Q K^T`` and ``A V``, over all query heads, so GQA does
      not change it);
    * ``attention_dim`` (heads x head dim, default ``dim``) replaces ``d`` as the width
      of Q, O and the attention products where a model's heads do not tile its hidden
      size (an explicit ``head_dim``): QKVO is then ``2*n*d*a + 2*n*d*(ratio*a)`` and
      attention ``2*n^2*a``;
    * MLP: ``mlp_matrices*n*d*m`` (2 for a plain MLP, 3 for a gated one such as SwiGLU).

    Norms, softmax, activations and biases are ignored, matching what
    :func:`count_flops` counts, so given the token count each layer actually saw
    (which token reduction changes from layer to layer), the sum of this formula
    cross-checks the counter exactly. The ``n^2`` term is why reducing tokens early
    pays more than linearly.

    ``n_kv_heads_ratio`` is ``n_kv_heads / n_heads`` in ``(0, 1]`` (a :class:`~fractions.Fraction`
    keeps it exact, e.g. 4 / 28); ``ratio * attention_dim`` (the K/V projection width) must be a
    whole number.
    """
    if not 0.0 < n_kv_heads_ratio <= 1.0:
        raise ValueError(f"n_kv_heads_ratio must be in (0, 1], got {n_kv_heads_ratio}")
    width = dim if attention_dim is None else attention_dim
    kv_dim = n_kv_heads_ratio * width
    if kv_dim != round(kv_dim):
        raise ValueError(
            f"n_kv_heads_ratio * dim must be a whole number (the K/V width), got {kv_dim}"
        )
    n, d, m = n_tokens, dim, mlp_dim
    qkvo_macs = 2 * n * d * width + 2 * n * d * round(kv_dim)
    attention_macs = 2 * n * n * width
    mlp_macs = mlp_matrices * n * d * m
    return 2 * (qkvo_macs + attention_macs + mlp_macs)
