"""The fused, chunked output layer + cross-entropy against the plain computation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pocketlm.config import ModelConfig
from pocketlm.losses import IGNORE_INDEX, NextTokenLoss, chunked_token_nll, fused_linear_cross_entropy, token_nll_sum
from pocketlm.model import GPT


def _problem(seed=0, n=300, c=32, v=500):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).requires_grad_()
    w = (0.2 * torch.randn(v, c, generator=g)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, w, t


def _loss_and_grads(fn, h, w, t, precision):
    h.grad = w.grad = None
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        loss = fn(h, w, t)
    (loss / 7).backward()  # a scale, as the trainer divides by the step's token count
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 1000])
def test_matches_plain_cross_entropy_in_fp32(chunk):
    h, w, t = _problem()
    fused = _loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_tokens=chunk), h, w, t, "fp32")
    plain = _loss_and_grads(lambda h, w, t: token_nll_sum(h @ w.t(), t), h, w, t, "fp32")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_matches_plain_cross_entropy_under_bf16_autocast():
    h, w, t = _problem(seed=1)
    fused = _loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_tokens=64), h, w, t, "bf16")
    plain = _loss_and_grads(lambda h, w, t: token_nll_sum(h @ w.t(), t), h, w, t, "bf16")
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(fused[1:], plain[1:]):  # bf16 gradients: compare relative to their scale
        assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32


def test_ignored_targets_contribute_nothing():
    h, w, t = _problem(seed=2)
    all_ignored = torch.full_like(t, IGNORE_INDEX)
    loss = fused_linear_cross_entropy(h, w, all_ignored)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_without_grad_it_only_computes_the_loss():
    h, w, t = _problem(seed=3)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=50)
    torch.testing.assert_close(loss, token_nll_sum(h @ w.t(), t).detach(), rtol=1e-5, atol=1e-5)


def test_model_nll_sum_equals_logits_path():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300, dropout=0.0)).eval()
    idx = torch.randint(0, 300, (3, 16))
    targets = torch.randint(0, 300, (3, 16))
    targets[0, 10:] = IGNORE_INDEX
    torch.testing.assert_close(NextTokenLoss(model)(idx, targets), token_nll_sum(model(idx), targets),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 300])
def test_chunked_token_nll_equals_plain_per_token_nll(chunk):
    """Evaluation's per-token NLL, a chunk of logits at a time, against the full-logits computation."""
    h, w, t = _problem(seed=5)
    expected = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX, reduction="none")
    got = chunked_token_nll(h.detach(), w.detach(), t, chunk_tokens=chunk)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert bool((got[t == IGNORE_INDEX] == 0).all())


def test_weight_gradient_through_autograd_when_asked():
    """accumulate_grad=False (data parallelism) returns the weight's gradient through autograd:
    the same gradient, and nothing written into .grad behind autograd's back."""
    h, w, t = _problem(seed=6)
    expected = _loss_and_grads(lambda h, w, t: token_nll_sum(h @ w.t(), t), h, w, t, "fp32")
    w.grad = None
    loss = fused_linear_cross_entropy(h, w, t, chunk_tokens=64, accumulate_grad=False)
    (grad_w,) = torch.autograd.grad(loss / 7, w)
    assert w.grad is None
    torch.testing.assert_close(grad_w, expected[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_softmax_gradient_matches_the_eager_one(precision):
    """The torch.compile path (a separate, functional formulation) against the eager in-place one,
    chunk boundaries and ignored rows included; a second, shorter chunk shape is the last chunk."""
    h, w, t = _problem(seed=4)
    eager = _loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_tokens=128), h, w, t, precision)
    compiled = _loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_tokens=128, compiled=True),
                               h, w, t, precision)
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(compiled[0], eager[0], **tol)
    for a, b in zip(compiled[1:], eager[1:]):
        assert (a - b).abs().max() <= (1e-5 if precision == "fp32" else 0.02) * b.abs().max()
