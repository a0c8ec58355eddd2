"""ops.merge: exact results on hand-built tensors (DESIGN: "ops: exact results on hand-built tensors")."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.ops.merge import TokenPlan, apply_plan, complement, gather_tokens, kept_first, output_index, size_bias


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def naive_apply(plan: TokenPlan, x: torch.Tensor, sizes: torch.Tensor | None):
    """Loop over python lists: x_t <- (s_t x_t + sum a s_d x_d) / (s_t + sum a s_d)."""
    xs = x.double().tolist()
    batch, n, channels = x.shape
    ss = sizes.double().tolist() if sizes is not None else [[1.0] * n for _ in range(batch)]
    outs, out_sizes = [], []
    for b in range(batch):
        keep = plan.keep[b].tolist()
        acc = [[ss[b][i] * v for v in xs[b][i]] for i in keep] + [[0.0] * channels for _ in range(plan.new_tokens)]
        size = [ss[b][i] for i in keep] + [0.0] * plan.new_tokens
        if plan.merge_src is not None:
            for m, d in enumerate(plan.merge_src[b].tolist()):
                for slot, w in zip(plan.merge_dst[b, m].tolist(), plan.merge_weight[b, m].tolist()):
                    w = w * ss[b][d]
                    size[slot] += w
                    acc[slot] = [a + w * v for a, v in zip(acc[slot], xs[b][d])]
        outs.append([[a / s if s > 0 else 0.0 for a in row] for row, s in zip(acc, size)])
        out_sizes.append(size)
    return torch.tensor(outs, dtype=torch.float64), torch.tensor(out_sizes, dtype=torch.float64)


# --- index helpers -----------------------------------------------------------


def test_complement_is_ascending_rest():
    discard = torch.tensor([[4, 1], [0, 5]])
    assert complement(discard, 6).tolist() == [[0, 2, 3, 5], [1, 2, 3, 4]]


def test_complement_of_nothing_and_everything():
    assert complement(torch.zeros(2, 0, dtype=torch.long), 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert complement(torch.tensor([[2, 0, 1]]), 3).shape == (1, 0)


def test_kept_first_pads_each_row_after_its_selection():
    selected = torch.tensor([[False, True, False, True, False], [True, False, False, False, False], [True, True, True, False, False]])
    keep, valid = kept_first(selected)
    assert keep.tolist() == [[1, 3, 0], [0, 1, 2], [0, 1, 2]]
    assert valid.tolist() == [[True, True, False], [True, False, False], [True, True, True]]


def test_output_index_table():
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    assert output_index(keep, 6).tolist() == [[0, -1, 1, -1, -1, 2], [-1, 0, -1, 1, 2, -1]]


def test_gather_tokens_any_rank():
    x = torch.arange(2 * 4 * 3 * 2).view(2, 4, 3, 2)
    index = torch.tensor([[3, 0], [1, 1]])
    got = gather_tokens(x, index)
    assert got.shape == (2, 2, 3, 2)
    assert torch.equal(got[0, 0], x[0, 3]) and torch.equal(got[0, 1], x[0, 0])
    assert torch.equal(got[1, 0], x[1, 1]) and torch.equal(got[1, 1], x[1, 1])
    sizes = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert gather_tokens(sizes, index).tolist() == [[4.0, 1.0], [6.0, 6.0]]


def test_num_out():
    assert TokenPlan(keep=torch.zeros(2, 5, dtype=torch.long)).num_out == 5
    assert TokenPlan(keep=torch.zeros(2, 5, dtype=torch.long), new_tokens=3).num_out == 8


# --- apply_plan -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pure_pruning_is_an_exact_gather(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g).to(dtype)
    sizes = torch.rand(2, 7, generator=g) + 0.5
    keep = torch.tensor([[0, 3, 6], [1, 2, 4]])
    out, out_sizes = apply_plan(TokenPlan(keep=keep), x, sizes)
    assert out.dtype == dtype
    assert torch.equal(out, torch.stack([x[0, [0, 3, 6]], x[1, [1, 2, 4]]]))
    assert torch.equal(out_sizes, torch.stack([sizes[0, [0, 3, 6]], sizes[1, [1, 2, 4]]]))
    # An empty merge list is the same as none.
    empty = TokenPlan(keep=keep, merge_src=torch.zeros(2, 0, dtype=torch.long),
                      merge_dst=torch.zeros(2, 0, 1, dtype=torch.long), merge_weight=torch.zeros(2, 0, 1))
    out2, sizes2 = apply_plan(empty, x, sizes)
    assert torch.equal(out2, out) and torch.equal(sizes2, out_sizes)


def test_pruning_without_sizes_gives_unit_sizes():
    x = torch.arange(12.0).view(1, 4, 3)
    out, sizes = apply_plan(TokenPlan(keep=torch.tensor([[1, 3]])), x)
    assert out.tolist() == [[[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]]
    assert sizes.dtype == torch.float32 and sizes.tolist() == [[1.0, 1.0]]


def test_tome_size_weighted_average():
    # Token 1 (size 2) folds into token 2 (size 3): (2*[1,4] + 3*[6,-1]) / 5 = [4, 1], size 5.
    x = t([[[9.0, 9.0], [1.0, 4.0], [6.0, -1.0], [0.5, 0.25]]])
    sizes = t([[1.0, 2.0, 3.0, 7.0]])
    plan = TokenPlan(keep=torch.tensor([[0, 2, 3]]), merge_src=torch.tensor([[1]]),
                     merge_dst=torch.tensor([[[1]]]), merge_weight=torch.ones(1, 1, 1))
    out, out_sizes = apply_plan(plan, x, sizes)
    assert out.tolist() == [[[9.0, 9.0], [4.0, 1.0], [0.5, 0.25]]]
    assert out_sizes.tolist() == [[1.0, 5.0, 7.0]]


def test_tome_two_sources_into_one_target():
    # Tokens 0 (size 1) and 2 (size 4) fold into token 1 (size 3): (1*2 + 3*6 + 4*10)/8 = 7.5, size 8.
    x = t([[[2.0], [6.0], [10.0]]])
    sizes = t([[1.0, 3.0, 4.0]])
    plan = TokenPlan(keep=torch.tensor([[1]]), merge_src=torch.tensor([[0, 2]]),
                     merge_dst=torch.tensor([[[0], [0]]]), merge_weight=torch.ones(1, 2, 1))
    out, out_sizes = apply_plan(plan, x, sizes)
    assert out.tolist() == [[[7.5]]]
    assert out_sizes.tolist() == [[8.0]]


def test_ficoco_self_preserving_merge_two_targets():
    # sizes reset to 1 (sizes=None): x_j <- (x_j + sum a x_i) / (1 + sum a).
    x = t([[[4.0, 0.0], [8.0, 8.0], [0.0, 4.0], [2.0, 2.0]]])
    plan = TokenPlan(
        keep=torch.tensor([[0, 2]]),
        merge_src=torch.tensor([[1, 3]]),
        merge_dst=torch.tensor([[[0, 1], [1, 0]]]),
        merge_weight=t([[[0.25, 0.75], [0.5, 0.0]]]),  # token 3 has one target; slot 2 unused
    )
    out, sizes = apply_plan(plan, x)
    # out0 = ([4,0] + .25*[8,8]) / 1.25 = [4.8, 1.6]
    # out1 = ([0,4] + .75*[8,8] + .5*[2,2]) / 2.25 = [7, 11] / 2.25
    expected = t([[[4.8, 1.6], [7.0 / 2.25, 11.0 / 2.25]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sizes, t([[1.25, 2.25]]), rtol=0, atol=0)


def test_evit_fused_token_is_attention_weighted_mean():
    # Keep 0, 1, 3; fold 2 and 4 into one appended empty slot with their attention as weights.
    x = t([[[1.0, 1.0], [2.0, 2.0], [10.0, 0.0], [3.0, 3.0], [0.0, 20.0]]])
    a2, a4 = 0.1, 0.3
    plan = TokenPlan(
        keep=torch.tensor([[0, 1, 3]]), merge_src=torch.tensor([[2, 4]]),
        merge_dst=torch.tensor([[[3], [3]]]), merge_weight=t([[[a2], [a4]]]),
        new_tokens=1, new_positions=torch.tensor([[-1]]),
    )
    out, sizes = apply_plan(plan, x)
    assert out.shape == (1, 4, 2) and plan.num_out == 4
    assert out[0, :3].tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    fused = [(a2 * 10.0) / (a2 + a4), (a4 * 20.0) / (a2 + a4)]  # [2.5, 15]
    torch.testing.assert_close(out[0, 3], t(fused), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sizes, t([[1.0, 1.0, 1.0, a2 + a4]]))


def test_empty_slot_without_contributions_is_zero_not_nan():
    x = t([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    plan = TokenPlan(keep=torch.tensor([[0]]), merge_src=torch.tensor([[1, 2]]),
                     merge_dst=torch.tensor([[[1], [1]]]), merge_weight=torch.ones(1, 2, 1), new_tokens=2)
    out, sizes = apply_plan(plan, x)
    assert out.tolist() == [[[1.0, 2.0], [4.0, 5.0], [0.0, 0.0]]]
    assert sizes.tolist() == [[1.0, 2.0, 0.0]]


def test_pooling_into_appended_slots():
    # Four 1-D tokens pooled into two appended cells with overlap: cell 0 <- {0,1,2}, cell 1 <- {2,3}.
    x = t([[[1.0], [2.0], [3.0], [5.0]]])
    plan = TokenPlan(
        keep=torch.zeros(1, 0, dtype=torch.long), merge_src=torch.tensor([[0, 1, 2, 3]]),
        merge_dst=torch.tensor([[[0, 0], [0, 0], [0, 1], [1, 0]]]),
        merge_weight=t([[[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]]), new_tokens=2,
    )
    out, sizes = apply_plan(plan, x)
    assert out.tolist() == [[[2.0], [4.0]]]
    assert sizes.tolist() == [[3.0, 2.0]]


def random_plan(g, batch, n, k, m, targets, new_tokens=0):
    keeps, srcs = [], []
    for _ in range(batch):
        perm = torch.randperm(n, generator=g)
        keeps.append(perm[:k].sort().values)
        srcs.append(perm[k : k + m])
    dst = torch.randint(0, k + new_tokens, (batch, m, targets), generator=g)
    weight = torch.rand(batch, m, targets, generator=g)
    weight[..., -1] = torch.where(torch.rand(batch, m, generator=g) < 0.5, 0.0, weight[..., -1])
    return TokenPlan(keep=torch.stack(keeps), merge_src=torch.stack(srcs), merge_dst=dst, merge_weight=weight, new_tokens=new_tokens)


@pytest.mark.parametrize("seed", range(4))
def test_apply_plan_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    plan = random_plan(g, batch=3, n=11, k=5, m=4, targets=3, new_tokens=seed % 3)
    x = torch.randn(3, 11, 6, generator=g)
    sizes = torch.rand(3, 11, generator=g) * 3 + 1 if seed % 2 else None
    out, out_sizes = apply_plan(plan, x, sizes)
    want, want_sizes = naive_apply(plan, x, sizes)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_sizes.double(), want_sizes, rtol=1e-6, atol=1e-6)


def test_bf16_stays_bf16_and_close_to_fp32():
    g = torch.Generator().manual_seed(7)
    plan = random_plan(g, batch=2, n=40, k=10, m=30, targets=2, new_tokens=1)
    x = torch.randn(2, 40, 16, generator=g).bfloat16()
    sizes = torch.rand(2, 40, generator=g) + 1
    out, out_sizes = apply_plan(plan, x, sizes)
    assert out.dtype == torch.bfloat16 and out_sizes.dtype == torch.float32
    ref, ref_sizes = apply_plan(plan, x.float(), sizes)
    # The only loss is the final cast to bf16 (accumulation is fp32).
    assert torch.equal(out, ref.bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(out_sizes, ref_sizes)


def test_size_bias():
    sizes = t([[1.0, 2.0, 4.0], [1.0, 1.0, 8.0]])
    bias = size_bias(sizes, torch.float16)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.float16
    torch.testing.assert_close(bias[:, 0, 0].float(), t([[0.0, math.log(2), math.log(4)], [0.0, 0.0, math.log(8)]]), rtol=1e-3, atol=1e-3)
