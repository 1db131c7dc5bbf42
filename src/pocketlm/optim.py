"""Optimizers and the learning-rate schedule.

``Optimizers`` is what the training step talks to: it sets the learning rate, measures and
clips the global gradient norm, steps and zeroes, and saves and loads its state, whether the
gradients live in ``.grad`` (AdamW) or in the bf16 buffers of ``--low-memory``'s AdamW.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from pocketlm.config import OptimConfig
from pocketlm.lowmem import LowMemoryAdamW


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices and embeddings, never biases or LayerNorm gains."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Optimizers:
    """One or more ``torch.optim`` optimizers stepped together as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def parameters(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def weight_grad_sink(self) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
        """Where a fused kernel must add a parameter's gradient, when not into ``.grad``:
        ``sink(param, grad)``. None means ``.grad``."""
        for opt in self.optimizers:
            if isinstance(opt, LowMemoryAdamW):
                return opt.accumulate
        return None

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (before clipping); scales the gradients down to ``max_norm``
        when it is above it (0 disables clipping)."""
        low = [opt for opt in self.optimizers if isinstance(opt, LowMemoryAdamW)]
        if low:  # its gradients live in its own bf16 buffers
            return low[0].clip_grad_norm_(max_norm)
        params = [p for p in self.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for opt in self.optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        if len(self.optimizers) == 1:  # the layout of a plain torch optimizer, as earlier versions saved it
            return self.optimizers[0].state_dict()
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"] if "optimizers" in state else [state]
        if len(states) != len(self.optimizers):
            raise ValueError(f"{len(states)} saved optimizer states for {len(self.optimizers)} optimizers")
        for opt, saved in zip(self.optimizers, states):
            opt.load_state_dict(saved)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, *,
                    low_memory: bool = False) -> Optimizers:
    """AdamW over ``decay_groups``: fused on CPU and CUDA, or ``LowMemoryAdamW`` (bf16 gradients
    and moments) for ``--low-memory``."""
    groups = decay_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if low_memory:
        return Optimizers([LowMemoryAdamW(groups, lr=cfg.lr, betas=betas)])
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": betas}
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel for the whole update, and no foreach temporaries
    return Optimizers([torch.optim.AdamW(groups, **kwargs)])


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup to the peak, then cosine decay to ``min_ratio`` of it at ``total_steps``."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.1

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        floor = self.peak_lr * self.min_ratio
        return floor + 0.5 * (self.peak_lr - floor) * (1.0 + math.cos(math.pi * progress))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
