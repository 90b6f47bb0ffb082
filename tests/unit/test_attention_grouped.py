"""sftlab_varlen's CPU paths against SDPA run on every example alone: the grouped path (padded
batches of examples of similar length) and the per-example path must give the same outputs and
gradients for any mix of lengths, grouped-query heads and several rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.train import attention
from sftlab.train.attention import _padded_layout, varlen_attention_forward


class Module:
    is_causal = True


def reference(q, k, v, bounds):
    """SDPA on each example alone, copied out of the inputs: [B, H, L, D] -> [B, L, H, D]."""
    b, h, length, d = q.shape
    out = torch.zeros(b * length, h, d, dtype=q.dtype)
    for s, e in zip(bounds, bounds[1:]):
        row, a, z = s // length, s % length, s % length + e - s
        piece = F.scaled_dot_product_attention(q[row : row + 1, :, a:z].clone(), k[row : row + 1, :, a:z].clone(),
                                               v[row : row + 1, :, a:z].clone(), is_causal=True,
                                               enable_gqa=q.shape[1] != k.shape[1])
        out[s:e] = piece[0].transpose(0, 1)
    return out.view(b, length, h, d)


def run(fn, q, k, v, bounds):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, bounds)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# (rows, length, example lengths per row): equal lengths, very different ones, one-token examples
CASES = [
    (1, 64, [64]),
    (1, 96, [30, 5, 1, 20, 19, 21]),
    (1, 120, [3, 40, 41, 1, 2, 33]),
    (2, 50, [10, 40, 25, 25]),  # rows 0 and 1 (B > 1: rows not flattened)
    (1, 500, [230, 200, 60, 10]),  # groups wider than SHORT_WIDTH take SDPA's kernel, the others _ShortCausal
]


@pytest.mark.parametrize("rows,length,lengths", CASES)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("path", ["grouped", "per_example"])
def test_varlen_cpu_paths_equal_each_example_alone(rows, length, lengths, kv_heads, path):
    torch.manual_seed(0)
    q = torch.randn(rows, 4, length, 16)
    k, v = torch.randn(2, rows, kv_heads, length, 16)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    assert bounds[-1] == rows * length
    if path == "per_example":  # the path taken where a mask is needed (window, sinks); causal here
        fn = lambda q, k, v, b: attention._per_example(q, k, v, b, 0.0, None, None).view(  # noqa: E731
            rows, length, 4, 16)
    else:
        fn = lambda q, k, v, b: varlen_attention_forward(Module(), q, k, v, None, cu_seq_lens_q=b)[0]  # noqa: E731
    expected = run(reference, q, k, v, bounds)
    got = run(fn, q, k, v, bounds)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (name, (a - b).abs().max())


def test_padded_layout_maps_every_position_once_and_groups_similar_lengths():
    bounds = (0, 100, 180, 181, 241, 300, 302)  # lengths 100, 80, 1, 60, 59, 2
    groups, gather, inverse, back = _padded_layout(bounds, torch.device("cpu"))
    # within 1.5x: 100 & 80, 60 & 59; 1 is not within 1.5x of 2. On a CPU each group's width is its
    # longest rounded up by shape_bucket (a fixed set of matmul shapes for oneDNN's kernel caches)
    assert groups == [(2, 104), (2, 64), (1, 8), (1, 8)]
    assert _padded_layout(bounds, torch.device("meta"))[0] == [(2, 100), (2, 60), (1, 2), (1, 1)]
    assert gather[inverse].tolist() == list(range(300 + 2))  # each flat position is picked back from its own copy
    assert sorted(set(gather.tolist())) == list(range(302))
    assert len(gather) == sum(c * n for c, n in groups)
    assert back[inverse].tolist() == list(range(302)) and int((back == 302).sum()) == len(gather) - 302


def test_short_groups_path_is_closer_to_fp64_than_sdpa_in_bf16():
    """_ShortCausal computes in fp32 from bf16 inputs: its output and gradients must be at least as
    close to an fp64 reference as SDPA's own bf16 kernel (which it replaces for short groups)."""
    torch.manual_seed(0)
    q = (torch.randn(12, 6, 96, 32) * 2).bfloat16()
    k = (torch.randn(12, 2, 96, 32) * 2).bfloat16()
    v = torch.randn(12, 2, 96, 32).bfloat16()
    grad = torch.randn(12, 6, 96, 32).bfloat16()

    def result(fn, *inputs):
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out.backward(grad.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    exact = result(sdpa, q.double(), k.double(), v.double())
    short = result(lambda q, k, v: attention._ShortCausal.apply(q, k, v, 32**-0.5), q, k, v)
    flash = result(sdpa, q, k, v)
    for name, s, f, e in zip(["out", "dq", "dk", "dv"], short, flash, exact):
        short_err, flash_err = ((s - e).norm() / e.norm()).item(), ((f - e).norm() / e.norm()).item()
        assert short_err <= flash_err, (name, short_err, flash_err)
