"""``--low-memory``: gradients and AdamW moments kept in bf16, weights still fp32.

Per parameter this needs 4 (weights) + 2 (gradient) + 2 + 2 (moments) = 10 bytes instead of
16, which on gpt2-125m is 1.16 GiB instead of 1.85 GiB before any activation.

- Gradients: autograd still computes each parameter's gradient in fp32, but a post-accumulate
  hook adds it into a bf16 buffer and frees it at once, so at most one parameter's fp32
  gradient exists at a time. The fused output layer adds its weight gradient to the buffer
  directly (``accumulate``).
- The update runs in fp32 on slices of at most ``SLICE`` elements (upcast moments and gradient,
  the AdamW step, round back), so the optimizer step needs only a few MB of scratch memory.

bf16 keeps 8 significant bits. With betas (0.9, 0.95) each moment update changes the moment by
5-10%, far more than bf16's rounding step, so updates are not lost to rounding.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

SLICE = 1 << 22  # elements updated at once: 16 MiB per fp32 temporary


class LowMemoryAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with bf16 gradient buffers and bf16 moments."""

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.grad_buffers: dict[torch.nn.Parameter, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(self._take_grad)

    def _take_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:  # None if another hook took it first
            self.accumulate(p, p.grad)
            p.grad = None

    def accumulate(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` (any dtype) into ``p``'s bf16 gradient buffer."""
        buffer = self.grad_buffers.get(p)
        if buffer is None:
            self.grad_buffers[p] = grad.to(torch.bfloat16)
        else:
            buffer.add_(grad)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts loaded state to each parameter's dtype (fp32); the moments are bf16.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.grad_buffers.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm over the buffers (in fp32); scales them down to ``max_norm``."""
        norms = [torch.linalg.vector_norm(b, dtype=torch.float32) for b in self.grad_buffers.values()]
        if not norms:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for b in self.grad_buffers.values():
                b.mul_(coef.to(b.dtype))
        return total

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grad = self.grad_buffers.get(p)
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"].item())
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                step_size, denom_scale = lr / bias1, 1 / math.sqrt(bias2)
                flat = [t.view(-1) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), SLICE):
                    w, g, m, v = (t[start:start + SLICE] for t in flat)
                    g32 = g.float()
                    m32 = m.float().mul_(beta1).add_(g32, alpha=1 - beta1)
                    v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                    if decay:
                        w.mul_(1 - lr * decay)
                    w.addcdiv_(m32, v32.sqrt().mul_(denom_scale).add_(eps), value=-step_size)
                    m.copy_(m32)
                    v.copy_(v32)
