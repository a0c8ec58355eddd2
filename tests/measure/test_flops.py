"""count_flops / transformer_block_flops: exact values, CPU SDPA, meta device, timm ViT."""

import re

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

from tokenreduce.measure import count_flops, transformer_block_flops

# The CPU flash kernel needs equal q/k and v head dims; D_V_MATH != D_QK forces the math path.
B, H, LQ, LK, D_QK, D_V, D_V_MATH = 2, 4, 8, 6, 16, 16, 12
CPU_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
CPU_FLASH_BACKWARD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


class _OpLog(TorchDispatchMode):
    """Records the aten ops that actually run, to prove which SDPA path a test exercises."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn):
    with _OpLog() as log:
        fn()
    return log.ops


def sdpa_formula(b, h, lq, lk, d_qk, d_v):
    return 2 * b * h * lq * lk * d_qk + 2 * b * h * lq * lk * d_v


def test_linear_exact():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    report = count_flops(lambda: layer(x))
    assert report.total == 2 * 4 * 64 * 32
    assert report.by_module["Global"] == report.total
    assert report.by_module["Linear"] == report.total


def _qkv(device, kv_heads=H, d_v=D_V):
    q = torch.randn(B, H, LQ, D_QK, device=device)
    k = torch.randn(B, kv_heads, LK, D_QK, device=device)
    v = torch.randn(B, kv_heads, LK, d_v, device=device)
    return q, k, v


SDPA_VARIANTS = {
    "plain": {},
    "float_mask": {"attn_mask": torch.randn(B, 1, LQ, LK)},
    "bool_mask": {"attn_mask": torch.rand(LQ, LK) > 0.3},
    "causal": {"is_causal": True},
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("variant", list(SDPA_VARIANTS))
def test_sdpa_counted_once(device, variant):
    # On CPU this runs _scaled_dot_product_flash_attention_for_cpu (custom formula);
    # on meta the math fallback's bmm ops. Both must give the formula exactly once.
    q, k, v = _qkv(device)
    kwargs = {
        key: val.to(device) if isinstance(val, torch.Tensor) else val
        for key, val in SDPA_VARIANTS[variant].items()
    }

    def call():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    ops = dispatched_ops(call)
    assert (CPU_FLASH in ops) == (device == "cpu")
    assert ("aten::bmm" in ops) == (device == "meta")
    assert count_flops(call).total == sdpa_formula(B, H, LQ, LK, D_QK, D_V)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_gqa_counts_query_heads(device):
    q, k, v = _qkv(device, kv_heads=2)

    def call():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    assert (CPU_FLASH in dispatched_ops(call)) == (device == "cpu")
    assert count_flops(call).total == sdpa_formula(B, H, LQ, LK, D_QK, D_V)


@pytest.mark.parametrize(
    "d_v, dropout_p", [(D_V_MATH, 0.0), (D_V, 0.5)], ids=["unequal_head_dims", "dropout"]
)
def test_sdpa_math_fallback_on_cpu_counted_once(d_v, dropout_p):
    # These send CPU SDPA to the math path (bmm), which torch already counts.
    q, k, v = _qkv("cpu", d_v=d_v)

    def call():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    ops = dispatched_ops(call)
    assert CPU_FLASH not in ops and ops.count("aten::bmm") == 2
    assert count_flops(call).total == sdpa_formula(B, H, LQ, LK, D_QK, d_v)


def test_sdpa_backward_on_cpu():
    q, k, v = (t.requires_grad_() for t in _qkv("cpu"))

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    assert CPU_FLASH_BACKWARD in dispatched_ops(fwd_bwd)
    forward = sdpa_formula(B, H, LQ, LK, D_QK, D_V)
    backward = 2 * B * H * LQ * LK * (3 * D_QK + 2 * D_V)
    assert count_flops(fwd_bwd).total == forward + backward


def test_meta_device_large_shapes():
    # 64 x 4096 x 8192 float32 activations would need 8 GiB; on meta nothing is allocated.
    layer = torch.nn.Linear(8192, 8192, bias=False, device="meta")
    x = torch.empty(64, 4096, 8192, device="meta")
    assert count_flops(lambda: layer(x)).total == 2 * 64 * 4096 * 8192 * 8192

    q = torch.empty(8, 16, 16384, 128, device="meta")
    report = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert report.total == sdpa_formula(8, 16, 16384, 16384, 128, 128)


def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2).eval()


def test_vit_blocks_match_analytic_formula_and_meta():
    model = _tiny_vit()
    assert model.blocks[0].attn.fused_attn  # the SDPA path is what is being tested
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        cpu = count_flops(lambda: model(x))

    n_tokens = (32 // 4) ** 2 + 1  # patches + [CLS]
    expected_block = transformer_block_flops(n_tokens, dim=64, mlp_dim=256)
    block_keys = [k for k in cpu.by_module if re.fullmatch(r"VisionTransformer\.blocks\.\d+", k)]
    assert sorted(block_keys) == ["VisionTransformer.blocks.0", "VisionTransformer.blocks.1"]
    assert sum(cpu.by_module[k] for k in block_keys) == 2 * expected_block
    assert cpu.by_module["VisionTransformer.blocks"] == 2 * expected_block
    # Outside the blocks: patch-embedding conv and the classifier head.
    patch_embed = 2 * 64 * 64 * (3 * 4 * 4)
    head = 2 * 64 * 1000
    assert cpu.total == 2 * expected_block + patch_embed + head
    assert cpu.by_module["Global"] == cpu.total

    meta_model = _tiny_vit().to("meta")
    with torch.no_grad():
        meta = count_flops(lambda: meta_model(torch.empty(1, 3, 32, 32, device="meta")))
    assert meta.total == cpu.total
    assert meta.by_module == cpu.by_module


def test_transformer_block_flops_values():
    n, d, m = 10, 8, 32
    attn_proj = 4 * n * d * d
    attention = 2 * n * n * d
    assert transformer_block_flops(n, d, m) == 2 * (attn_proj + attention + 2 * n * d * m)
    assert transformer_block_flops(n, d, m) == 2 * (2560 + 1600 + 5120)
    # GQA with 1/4 of the KV heads: K and V projections are d x d/4.
    assert transformer_block_flops(n, d, m, n_kv_heads_ratio=0.25) == 2 * (
        2 * n * d * d + 2 * n * d * 2 + attention + 2 * n * d * m
    )
    # Gated MLP (SwiGLU) has three matrices.
    assert transformer_block_flops(n, d, m, mlp_matrices=3) == 2 * (
        attn_proj + attention + 3 * n * d * m
    )


@pytest.mark.parametrize("ratio", [0.0, 1.5, 0.3])
def test_transformer_block_flops_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError):
        transformer_block_flops(10, 8, 32, n_kv_heads_ratio=ratio)
