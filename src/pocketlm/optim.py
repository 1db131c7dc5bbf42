"""Optimizers and the learning-rate schedules.

``Optimizers`` is what the training step talks to: it sets the learning rate, measures and
clips the global gradient norm, steps and zeroes, and saves and loads its state, whether the
gradients live in ``.grad`` (AdamW, Muon) or in the bf16 buffers of ``--low-memory``'s AdamW.

``--optimizer muon`` trains the 2-D weight matrices inside the transformer blocks with
``torch.optim.Muon`` and everything else (embeddings, the tied output layer, biases, LayerNorm
gains) with AdamW, two optimizers stepped as one. The schedule gives AdamW's learning rate; each
parameter group carries an ``lr_scale`` (its own peak over ``--lr``), so Muon follows the same
shape from its own peak, ``--muon-lr``. It is ``FP32Muon``: on a CPU without native bf16 (no
AVX512-BF16 or AMX) the same update with its orthogonalisation in fp32, since torch's runs in
bf16, which such a CPU emulates at a small fraction of its fp32 speed; on one with native bf16,
and off the CPU, torch's own bf16 iteration, the faster there (``benchmarks/muon_step.py``;
docs/benchmarks.md, "Muon on the CPU").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Protocol

import torch
import torch.nn as nn

from pocketlm.config import OptimConfig, low_memory_refusal
from pocketlm.device import cpu_has_native_bf16
from pocketlm.errors import ConfigError
from pocketlm.lowmem import LowMemoryAdamW

# torch.optim.Muon's learning-rate adjustment: "original" is Keller Jordan's, each matrix's step
# scaled by sqrt(max(1, rows / cols)) so that tall and wide matrices move alike (c_attn, 3C x C,
# gets sqrt(3); c_fc, 4C x C, gets 2; the C-wide outputs 1). The peak of 0.02 (--muon-lr) is
# tuned for this adjustment. The other choice, "match_rms_adamw" (Moonshot's 0.2 sqrt(max(A, B))),
# is meant to reuse AdamW's learning rate and would need --muon-lr near --lr instead.
MUON_ADJUST_LR = "original"


def orthogonalized(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, as
    ``torch.optim.Muon`` runs it, but in ``update``'s own dtype rather than bf16."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.T if tall else update  # (short, long): the Gram matrix is the small one
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """``torch.optim.Muon``'s per-matrix learning-rate adjustment."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class FP32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its orthogonalisation in fp32 for parameters on a CPU that
    emulates bf16 (the same groups, hyperparameters, state and update; only the iteration's
    precision differs). Elsewhere it is torch's own step. ``fp32_iteration`` forces the choice
    for the CPU (None: fp32 exactly when the CPU lacks native bf16)."""

    def __init__(self, params: Any, *args: Any, fp32_iteration: bool | None = None, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.fp32_iteration = not cpu_has_native_bf16() if fp32_iteration is None else fp32_iteration

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if not self.fp32_iteration or any(p.device.type != "cpu" for group in self.param_groups
                                          for p in group["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                buf = self.state[param].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalized(update.float(), group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * muon_lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def hidden_matrix_names(model: nn.Module) -> list[str]:
    """The 2-D weights inside the transformer blocks (attention and MLP projections): what Muon
    trains. Embeddings and the output layer tied to them lie outside the blocks and stay with AdamW,
    as Muon's authors advise (found so empirically: an embedding is a table of rows looked up, not a
    linear map between hidden spaces)."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and n.startswith("transformer.h.")]


def decay_groups(model: nn.Module, weight_decay: float, skip: Collection[str] = ()) -> list[dict]:
    """AdamW parameter groups: decay matrices and embeddings, never biases or LayerNorm gains.
    Parameters named in ``skip`` (those another optimizer trains) are left out."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in skip}
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
        """Set every group's rate from the schedule's ``lr`` (AdamW's): times the group's
        ``lr_scale``, its peak relative to AdamW's (Muon's groups carry one; AdamW's none)."""
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
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP): each rank holds part of the sum
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

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
    and moments) for ``--low-memory``. With ``cfg.optimizer == "muon"``, Muon for the blocks'
    matrices (``hidden_matrix_names``) and AdamW for the rest."""
    muon_names = hidden_matrix_names(model) if cfg.optimizer == "muon" else []
    if muon_names and low_memory:
        raise ConfigError(low_memory_refusal(cfg.optimizer))
    groups = decay_groups(model, cfg.weight_decay, skip=set(muon_names))
    betas = (cfg.beta1, cfg.beta2)
    if low_memory:
        return Optimizers([LowMemoryAdamW(groups, lr=cfg.lr, betas=betas)])
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": betas}
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel for the whole update, and no foreach temporaries
    adamw = torch.optim.AdamW(groups, **kwargs)
    if not muon_names:
        return Optimizers([adamw])
    params = dict(model.named_parameters())
    muon = FP32Muon([{"params": [params[n] for n in muon_names], "lr_scale": cfg.muon_lr / cfg.lr}],
                    lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                    adjust_lr_fn=MUON_ADJUST_LR)  # torch's own step off the CPU
    return Optimizers([adamw, muon])


class Schedule(Protocol):
    """What the training loop asks of a schedule: the learning rate of each optimizer step."""

    def lr(self, step: int) -> float: ...

    def as_dict(self) -> dict[str, Any]: ...


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


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-stable-decay: linear warmup to the peak, the peak held, then a decay over the last
    ``decay_fraction`` of the run to ``min_ratio`` of the peak at ``total_steps``.

    The decay follows 1 - sqrt(progress), not a straight line: Hägele et al. (2024, "Scaling Laws
    and Compute-Optimal Training Beyond Fixed Training Durations") found this cooldown beat the
    linear one and matched a cosine schedule tuned to the run's length, with a cooldown of about
    20% of the steps. It keeps the rate high for longer and drops it fastest at the very end.
    Unlike cosine, the stable phase does not depend on the run's length, so a run trained further
    can branch from a checkpoint taken before its decay began.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_ratio: float = 0.1
    decay_fraction: float = 0.2

    @property
    def decay_start(self) -> int:
        """The first step of the decay (never inside the warmup)."""
        decay_steps = max(1, round(self.decay_fraction * self.total_steps))
        return max(self.warmup_steps, self.total_steps - decay_steps)

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        start = self.decay_start
        if step < start:
            return self.peak_lr
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        floor = self.peak_lr * self.min_ratio
        return floor + (self.peak_lr - floor) * (1.0 - math.sqrt(progress))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_schedule(cfg: OptimConfig, total_steps: int, warmup_steps: int) -> Schedule:
    """The schedule ``cfg.schedule`` names, peaking at ``cfg.lr`` (Muon's groups follow it scaled,
    see ``Optimizers.set_lr``)."""
    if cfg.schedule == "wsd":
        return WSDSchedule(cfg.lr, total_steps, warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
    return CosineSchedule(cfg.lr, total_steps, warmup_steps, cfg.min_lr_ratio)
