"""The two training workloads every benchmark compares, each built in one place.

* ``pocketlm_trainer``: the model, optimizer and objective exactly as ``pocketlm.train`` builds
  them (``plan.make_plan`` then ``train.build_state``), stepped by ``train.train_step``. The knobs
  are ``TrainConfig`` fields (precision, compile, checkpointing, full_checkpoint_blocks,
  low_memory...) plus ``fused_loss=False``, which swaps the fused output layer for the plain
  ``token_nll_sum(model(idx), targets)``: with ``SAVERS_OFF`` that is "memory savers off".
* ``hf_trainer``: Hugging Face ``GPT2LMHeadModel`` of the same shape, trained as its users do:
  AdamW (fused where available) over ``pocketlm.optim.decay_groups`` with pocketlm's betas,
  learning rate and weight decay, the mean loss of each micro-batch / the number of micro-batches,
  the same clipping, ``zero_grad(set_to_none=True)``; bf16 through ``pocketlm.device.autocast``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pocketlm.batching import MicroBatch
from pocketlm.config import PRESETS, ModelConfig, TrainConfig
from pocketlm.device import autocast, resolve_device, resolve_precision
from pocketlm.hf import hf_config
from pocketlm.losses import IGNORE_INDEX, token_nll_sum
from pocketlm.optim import decay_groups
from pocketlm.plan import make_plan, probe_machine
from pocketlm.train import build_state, train_step

NO_CHECKPOINTING = {"checkpointing": "none", "full_checkpoint_blocks": 0}
SAVERS_OFF = {**NO_CHECKPOINTING, "fused_loss": False}


@dataclass
class Trainer:
    """One way to train the workload: ``step(micro_batches)`` runs an optimizer step, returns its loss."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[list[MicroBatch]], float]
    info: dict[str, Any]


def train_config(model: str | ModelConfig, *, batch_size: int, seq_len: int, grad_accum: int = 1,
                 **settings: Any) -> TrainConfig:
    """The default recipe for a preset (or a custom ``ModelConfig``) with flat ``TrainConfig``
    settings; the context widened to ``seq_len`` where it is shorter."""
    preset, overrides = (model, {}) if isinstance(model, str) else ("gpt2-125m", dataclasses.asdict(model))
    if seq_len > dataclasses.replace(PRESETS[preset], **overrides).block_size:
        overrides["block_size"] = seq_len
    return TrainConfig(preset=preset, model=overrides).replace(batch_size=batch_size, grad_accum=grad_accum,
                                                               **settings)


class UnfusedLoss(torch.nn.Module):
    """The plain objective the fused output layer replaces: the full logits, then the summed NLL."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return token_nll_sum(self.model(input_ids, position_ids=position_ids, segment_ids=segment_ids), targets)


def pocketlm_trainer(cfg: TrainConfig, *, fused_loss: bool = True, **settings: Any) -> Trainer:
    """pocketlm as ``train()`` sets it up for ``cfg.replace(**settings)``."""
    cfg = cfg.replace(**settings)
    lengths = np.full(cfg.optim.batch_size * cfg.optim.grad_accum, cfg.model_config().block_size)
    plan = make_plan(cfg, probe_machine(cfg, measure_peak=False), lengths)
    state, objective = build_state(cfg, plan, lengths)
    if not fused_loss:
        objective = UnfusedLoss(state.model)
    device = torch.device(plan.device)

    def step(micro: list[MicroBatch]) -> float:
        loss, _ = train_step(objective, state.optimizer, micro, lr=cfg.optim.lr, device=device,
                             precision=plan.precision, scaler=state.scaler, grad_clip=cfg.optim.grad_clip)
        return loss

    (optimizer,) = state.optimizer.optimizers
    info = {"implementation": "pocketlm", "precision": plan.precision, "compiled": plan.compiled,
            "checkpointing": plan.checkpointing, "full_checkpoint_blocks": plan.full_checkpoint_blocks,
            "low_memory": plan.low_memory, "fused_loss": fused_loss, "optimizer": type(optimizer).__name__,
            "fused_adamw": bool(optimizer.defaults.get("fused")), "n_params": state.model.num_parameters()}
    return Trainer(state.model, optimizer, step, info)


def hf_dropouts(model_cfg: ModelConfig, dropouts: str = "pocketlm") -> dict[str, float]:
    """``pocketlm``: the model config's own dropouts; ``gpt2``: ``GPT2Config``'s stock 0.1 everywhere."""
    if dropouts == "gpt2":
        return {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    if dropouts != "pocketlm":
        raise ValueError(f"dropouts must be pocketlm or gpt2; got {dropouts!r}")
    return {"resid_pdrop": model_cfg.dropout, "embd_pdrop": model_cfg.dropout, "attn_pdrop": model_cfg.attn_dropout}


def hf_trainer(cfg: TrainConfig, *, dropouts: str = "pocketlm") -> Trainer:
    """``GPT2LMHeadModel`` of ``cfg``'s shape and seed, trained the way a Hugging Face user would."""
    import transformers

    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    model_cfg, o = cfg.model_config(), cfg.optim
    drop = hf_dropouts(model_cfg, dropouts)
    torch.manual_seed(cfg.run.seed)
    model = transformers.GPT2LMHeadModel(hf_config(model_cfg, **drop)).to(device).train()
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(decay_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), fused=fused)
    # pocketlm's targets are already shifted: transformers takes them as shift_labels where it can
    loss_fn = getattr(model, "loss_function", None)
    takes_shifted = loss_fn is not None and "shift_labels" in inspect.signature(loss_fn).parameters

    def labels_of(mb: MicroBatch) -> dict[str, torch.Tensor]:
        if takes_shifted:
            return {"labels": mb.targets, "shift_labels": mb.targets}
        labels = torch.full_like(mb.targets, IGNORE_INDEX)  # its own shift: the last position goes unpredicted
        labels[:, 1:] = mb.targets[:, :-1]
        return {"labels": labels}

    def step(micro: list[MicroBatch]) -> float:
        total = torch.zeros((), device=device)
        for mb in micro:
            mb = mb.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = model(input_ids=mb.input_ids, **labels_of(mb)).loss / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    info = {"implementation": "transformers.GPT2LMHeadModel", "precision": precision, "compiled": False,
            "attn_implementation": model.config._attn_implementation, "dropouts": dropouts, **drop,
            "fused_adamw": fused, "n_params": sum(p.numel() for p in model.parameters()),
            "targets_as": "shift_labels" if takes_shifted else "labels (own shift)"}
    return Trainer(model, optimizer, step, info)


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> MicroBatch:
    """Random tokens, every position a real target (memory does not depend on the values)."""
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return MicroBatch(tokens[:, :-1].clone(), tokens[:, 1:].clone(), None, None, batch_size * seq_len)
