"""Kernels for compiled training on a CPU, where ``torch.compile``'s defaults are slow.

``parallelize.apply_cpu_kernels`` swaps the modules below into a model for a compiled CPU run.
Each uses its kernel only inside a CPU ``torch.compile`` graph in training (see
``in_compiled_cpu_training``); eager code and GPUs keep PyTorch's own ops. ``benchmarks/cpu_kernels.py`` times each against the
op it replaces (docs/benchmarks.md, CPU kernels).

* ``Dropout``: inductor draws every CPU random number with a scalar Philox call, and draws each
  mask twice (forward, and again in backward rather than storing it). An integer hash of the
  element index under a per-call random seed vectorises and is just as replayable.
* ``gelu_tanh``: GPT-2's tanh GELU as ``x * sigmoid(2u)``, the same function (0.5 (1 + tanh u)
  = sigmoid(2u)); a vectorised exp is cheaper than a vectorised tanh.
* ``CpuAttention``: the CPU flash kernel's backward runs well below the bf16 GEMM speed; written
  as batched matrix products over bands of queries, compile fuses the softmax gradient around them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.model import ScaledDotProductAttention

_GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)
BACKWARD_QUERY_CHUNKS = 4  # the fastest of 1, 2, 4 and 8 at gpt2-125m's shapes (benchmarks/cpu_kernels.py)
_LOW32 = 0xFFFF_FFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays inside int64 (no overflow).
_MIX_MULTIPLIERS = (0x7FEB_352D, 0x5BD1_E995)


def in_compiled_cpu_training(x: torch.Tensor, training: bool) -> bool:
    return training and x.device.type == "cpu" and torch.compiler.is_compiling()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")``, in its sigmoid form inside CPU ``torch.compile`` graphs."""
    if not (x.device.type == "cpu" and torch.compiler.is_compiling()):
        return F.gelu(x, approximate="tanh")
    xf = x.float()
    u = _GELU_TANH_SCALE * (xf + 0.044715 * xf * xf * xf)
    return (xf * torch.sigmoid(2.0 * u)).to(x.dtype)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche of 32-bit values held in int64 (xorshift-multiply rounds)."""
    for multiplier in _MIX_MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _LOW32
    return x ^ (x >> 16)


def hashed_keep_mask(shape: torch.Size | tuple[int, ...], seed: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, each element kept with probability 1 - p, a pure function of ``seed`` (int64
    scalar tensor) and the element's flat index. Hashing the index before adding the seed makes
    masks of different seeds unrelated rather than shifted copies of each other."""
    index = torch.arange(math.prod(shape), device=seed.device, dtype=torch.int64).view(shape)
    bits = _mix32((_mix32(index) + seed) & _LOW32)
    return bits >= round(p * 2 ** 32)


def hashed_dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Inverted dropout with a ``hashed_keep_mask``; a fresh seed from torch's generator per call."""
    if p >= 1.0:
        return torch.zeros_like(x)
    if seed is None:
        seed = torch.randint(0, 2 ** 32, (), device=x.device)
    keep = hashed_keep_mask(x.shape, seed, p)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws its mask with ``hashed_dropout`` inside compiled CPU training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p > 0 and in_compiled_cpu_training(x, self.training):
            return hashed_dropout(x, self.p)
        return super().forward(x)


class GELUTanh(nn.GELU):
    """``nn.GELU(approximate="tanh")`` computed by ``gelu_tanh``."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class BandedAttention(ScaledDotProductAttention):
    """The model's attention, by ``CpuAttention`` inside compiled CPU training (without
    attention-probability dropout, which only SDPA provides)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        if in_compiled_cpu_training(q, self.training) and not self.dropout and q.size(-2) == k.size(-2):
            return CpuAttention.apply(q, k, v, mask)
        return super().forward(q, k, v, mask, is_causal)


class CpuAttention(torch.autograd.Function):
    """Causal (optionally block-diagonal) attention for compiled CPU training: PyTorch's CPU
    flash kernel forward, and a backward written as batched matrix products that
    ``torch.compile`` fuses around. The backward walks ``BACKWARD_QUERY_CHUNKS`` bands of
    queries, each against only the keys it can see, so most of the causal upper triangle is
    never computed and each band's scores stay small enough to stay in cache.
    ``mask``: (B, 1, T, T) bool, True where a query may attend, or None for plain causal."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                mask: torch.Tensor | None) -> torch.Tensor:
        scale = q.size(-1) ** -0.5
        T = q.size(-2)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]  # (1, 1, T, T)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        else:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, mask, out, lse = ctx.saved_tensors
        scale = ctx.scale
        T = q.size(-2)
        bounds = [T * i // BACKWARD_QUERY_CHUNKS for i in range(BACKWARD_QUERY_CHUNKS + 1)]
        grad_q = []
        grad_k = grad_v = None  # fp32 sums of every band's share, (B, nh, T, hs)
        for a, b in zip(bounds[:-1], bounds[1:]):  # queries [a, b) see keys [0, b) at most
            q_c, k_c, v_c, g_c = q[:, :, a:b], k[:, :, :b], v[:, :, :b], grad_out[:, :, a:b]  # (B, nh, ., hs)
            scores = torch.matmul(q_c, k_c.transpose(-1, -2)).float()  # (B, nh, b - a, b)
            probs = torch.where(mask[..., a:b, :b], (scores * scale - lse[:, :, a:b, None]).exp(), 0.0)
            grad_probs = torch.matmul(g_c, v_c.transpose(-1, -2)).float()  # (B, nh, b - a, b)
            row_dot = (g_c.float() * out[:, :, a:b].float()).sum(-1, keepdim=True)  # (B, nh, b - a, 1)
            grad_scores = (probs * (grad_probs - row_dot) * scale).to(q.dtype)
            grad_q.append(torch.matmul(grad_scores, k_c))
            unseen = (0, 0, 0, T - b)  # keys this band cannot see get nothing from it
            band_k = F.pad(torch.matmul(grad_scores.transpose(-1, -2), q_c).float(), unseen)
            band_v = F.pad(torch.matmul(probs.to(q.dtype).transpose(-1, -2), g_c).float(), unseen)
            grad_k = band_k if grad_k is None else grad_k + band_k
            grad_v = band_v if grad_v is None else grad_v + band_v
        return torch.cat(grad_q, dim=-2), grad_k.to(q.dtype), grad_v.to(q.dtype), None
