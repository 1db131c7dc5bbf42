"""An exponential moving average (EMA) of the weights, kept in fp32 beside the model.

``update(model)`` after each optimizer step moves the average towards the current weights;
``applied(model)`` puts the average into the model for an evaluation and the model's own weights
back afterwards, bit for bit, so training continues exactly as without it. The average's state
is plain tensors (``state_dict``), so it travels in ``state.pt`` and loads with
``torch.load(weights_only=True)``.

Early on the average would be dominated by the random initialisation: the decay used at update
``t`` (0-based) is ``min(decay, (1 + t) / (10 + t))``, TensorFlow's ``num_updates`` rule, which
averages over roughly the last ninth of the steps so far until the configured decay takes over.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn


class WeightEMA:
    """The average of ``model``'s parameters (tied ones once), by name, on the model's device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().to(torch.float32, copy=True) for _, p in model.named_parameters()]
        self.updates = 0

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        named = list(model.named_parameters())
        if [name for name, _ in named] != self.names:
            raise ValueError("this model's parameters are not the ones the EMA was built for")
        return [p for _, p in named]

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, in fp32, one fused call for all tensors."""
        weights = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` holding the averaged weights inside the ``with``; its own weights are copied
        aside and restored afterwards (even on an exception), exactly."""
        params = self._params(model)
        with torch.no_grad():
            own = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, own)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only: the update count and the averaged weights by parameter name."""
        return {"updates": torch.tensor(self.updates, dtype=torch.int64),
                "weights": {name: t for name, t in zip(self.names, self.shadow)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        if set(weights) != set(self.names):
            missing, extra = sorted(set(self.names) - set(weights)), sorted(set(weights) - set(self.names))
            raise ValueError(f"the saved EMA does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, shadow in zip(self.names, self.shadow):
            if weights[name].shape != shadow.shape:
                raise ValueError(f"the saved EMA's {name} has shape {tuple(weights[name].shape)}, "
                                 f"the model's {tuple(shadow.shape)}")
        torch._foreach_copy_(self.shadow, [weights[name] for name in self.names])
        self.updates = int(state["updates"])
