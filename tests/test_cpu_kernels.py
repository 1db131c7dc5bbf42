"""The compiled-CPU training kernels: hashed dropout masks (rate, independence, replay in
backward, compiled == eager) and the matrix-product attention backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm.cpu_kernels import CpuAttention, Dropout, gelu_tanh, hashed_dropout, hashed_keep_mask
from pocketlm.model import segment_mask
from pocketlm.parallelize import BLOCK_RUNNERS


def _seed(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), p=st.sampled_from([0.05, 0.1, 0.5, 0.9]))
def test_keep_rate_is_one_minus_p(seed, p):
    n = 200_000
    kept = hashed_keep_mask((n,), _seed(seed), p).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 6 * sigma


def test_neighbours_and_seeds_are_independent():
    """Adjacent elements, and the same element under two seeds, are kept together at the rate
    of independent draws. A mask built from (index + seed) would fail the shifted comparison:
    seed s + 1 would give seed s's mask moved by one element."""
    n, p = 400_000, 0.5
    a = hashed_keep_mask((n,), _seed(1234), p).float()
    b = hashed_keep_mask((n,), _seed(1235), p).float()
    tolerance = 6 * math.sqrt(0.25 * 0.75 / n)
    for left, right in ((a[:-1], a[1:]), (a, b), (a[1:], b[:-1])):
        assert abs((left * right).mean().item() - 0.25) < tolerance


def test_dropout_scales_the_kept_values():
    x = torch.randn(64, 96)
    y = hashed_dropout(x, 0.25, _seed(7))
    keep = hashed_keep_mask(x.shape, _seed(7), 0.25)
    torch.testing.assert_close(y, torch.where(keep, x / 0.75, 0.0))
    assert not torch.equal(hashed_dropout(x, 0.25), hashed_dropout(x, 0.25))  # fresh seed per call


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_mask_equals_eager(dynamic):
    """The hash's int64 arithmetic as inductor generates it (vectorised, with a scalar tail), also
    with symbolic sizes as bucket batching's varying lengths compile."""
    compiled = torch.compile(hashed_keep_mask, dynamic=dynamic)
    for shape in ((3, 1001), (2, 77)):
        for seed in (0, 1, 2 ** 32 - 1, 987_654_321):
            torch.testing.assert_close(compiled(shape, _seed(seed), 0.1), hashed_keep_mask(shape, _seed(seed), 0.1))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = Dropout(0.3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.drop(x) * 3.0


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_backward_replays_the_forward_mask_in_compiled_training(mode):
    """Compiled and recomputed under checkpointing, the gradient must use the mask the forward
    drew: zero exactly where the output was dropped, 3 / (1 - p) elsewhere."""
    module = _Scaled().train()
    runner = torch.compile(BLOCK_RUNNERS[mode])
    x = torch.randn(4, 32, 48, requires_grad=True)
    y = runner(module, x, None)
    y.sum().backward()
    dropped = y == 0
    assert 0.2 < dropped.float().mean().item() < 0.4
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, 3.0 / 0.7))


def test_eval_and_eager_dropout_are_pytorch_s():
    x = torch.randn(8, 8)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    torch.manual_seed(0)
    expected = F.dropout(x, 0.5, training=True)
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.5).train()(x), expected)


def test_compiled_gelu_is_pytorch_s_tanh_gelu():
    """The sigmoid form inside a compiled graph against eager ``F.gelu(approximate="tanh")``:
    values and gradients, fp32, over the range where the two formulas could part ways."""
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64).float().requires_grad_()
    expected = F.gelu(x, approximate="tanh")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = torch.compile(gelu_tanh)(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    # absolute: fp32 rounding of products with |x| up to 12 (12 x 1.2e-7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=3e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("T, compiled", [(24, False), (24, True), (3, False), (1, False)])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_attention_backward_matches_sdpa(packed, T, compiled):
    """The compiled-CPU attention (flash forward, banded matrix-product backward) against
    PyTorch's SDPA, plain causal and block-diagonal (packed documents), down to fewer queries
    than bands."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 3, T, 8)
    first = T * 10 // 24
    mask = segment_mask(torch.tensor([[0] * first + [1] * (T - first), [0] * T])) if packed else None
    expected_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    attention = torch.compile(CpuAttention.apply) if compiled else CpuAttention.apply
    out = attention(q, k, v, mask)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_attention_compiles_for_symbolic_lengths():
    """Bucket batching gives every length its own shape: the banded backward, compiled once with
    a symbolic length, must stay exact at lengths that do not divide into bands evenly."""
    attention = torch.compile(CpuAttention.apply, dynamic=True)
    for T in (24, 13):
        q, k, v = (torch.randn(1, 2, T, 8).requires_grad_() for _ in range(3))
        grad_out = torch.randn(1, 2, T, 8)
        expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad_out)
        got = torch.autograd.grad(attention(q, k, v, None), (q, k, v), grad_out)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
