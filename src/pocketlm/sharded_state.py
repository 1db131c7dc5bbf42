"""A sharded (``--fsdp``) run's weights and optimizer state, whole, in the one-folder checkpoint
format; and that state put back onto any number of ranks.

Through ``torch.distributed.checkpoint``'s state-dict helpers: ``get_model_state_dict`` and
``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True`` gather every shard
onto rank 0's CPU (the other ranks get nothing), ``set_optimizer_state_dict`` with
``full_state_dict=True`` keeps each rank's slice of the whole state. The helpers name optimizer
state by parameter name; a checkpoint keeps the layout of a plain ``torch.optim`` state dict
(parameters numbered in the optimizer's order) that a single process and DDP write, so any
checkpoint resumes with or without sharding and on any number of ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from pocketlm.optim import Optimizers

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, on rank 0's CPU ({} on the other ranks). Collective: every rank calls it."""
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=GATHERED).items()}


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (groups in turn)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(named_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed optimizer state (the helpers' layout) in ``torch.optim``'s numbered layout."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in named_state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named_state["param_groups"]]}


def by_name(numbered_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``by_index``."""
    return {"state": {names[int(i)]: value for i, value in numbered_state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in numbered_state["param_groups"]]}


class ShardedOptimizers(Optimizers):
    """``Optimizers`` over a model sharded with FSDP2: its state dict is the whole state, gathered
    on rank 0 (collective), and loading takes the whole state on every rank."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], model: nn.Module) -> None:
        if len(optimizers) != 1:
            raise ValueError("a sharded model trains with one optimizer")
        super().__init__(optimizers)
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        optimizer = self.optimizers[0]
        named = get_optimizer_state_dict(self.model, optimizer, options=GATHERED)
        if not named:  # not rank 0
            return {}
        return by_index(named, parameter_names(self.model, optimizer))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = self.optimizers[0]
        named = by_name(state, parameter_names(self.model, optimizer))
        set_optimizer_state_dict(self.model, optimizer, named, options=StateDictOptions(full_state_dict=True))
