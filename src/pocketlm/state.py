"""Training state: everything a checkpoint must hold for a resumed run to continue bit for bit.

``TrainState`` gathers the model, the optimizer, the loss scaler, the progress counters, the
batch stream and the RNG. ``state_dict()`` holds all of it but the weights (which go to
safetensors, see checkpoint.py) as tensors and plain containers, so it loads with
``torch.load(weights_only=True)``.

``BatchStream`` owns the epoch, the position inside it and the padding statistics. An epoch's
micro-batches are a pure function of (seed, epoch) (see batching.py), so the stream is rebuilt
from two integers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pocketlm.batching import Batch, PaddingStats, epoch_batches
from pocketlm.errors import CheckpointError


@dataclass
class Progress:
    """How far the run is."""

    step: int = 0
    tokens_seen: int = 0
    micro_splits: int = 0
    """Out-of-memory halvings so far: each micro-batch runs as 2**micro_splits pieces."""
    best_val_loss: float = float("inf")
    """The lowest validation loss so far (early stopping compares against it)."""
    evals_since_best: int = 0
    """Evaluations in a row without a new best."""
    stopped_early: int = 0
    """The step at which early stopping ended the run (0: it did not)."""


class BatchStream:
    """The run's micro-batches, epoch after epoch, in schedule order."""

    def __init__(self, kind: str, lengths: np.ndarray, batch_size: int, block_size: int, seed: int,
                 epoch: int = 0, micro_index: int = 0) -> None:
        self.kind, self.lengths, self.batch_size, self.block_size, self.seed = kind, lengths, batch_size, block_size, seed
        self.epoch, self.micro_index = epoch, micro_index
        self.batches = self._epoch(epoch)

    def _epoch(self, epoch: int) -> list[Batch]:
        return epoch_batches(self.kind, self.lengths, self.batch_size, self.block_size, self.seed, epoch)

    @property
    def starts_epoch(self) -> bool:
        return self.micro_index == 0

    def epoch_stats(self) -> PaddingStats:
        return PaddingStats.of(self.batches)

    def next_group(self, n: int) -> list[Batch]:
        """The next ``n`` micro-batches (fewer at the end of an epoch); ``advance`` moves past them."""
        return self.batches[self.micro_index:self.micro_index + n]

    def advance(self, n: int) -> None:
        self.micro_index += n
        if self.micro_index >= len(self.batches):
            self.epoch += 1
            self.micro_index = 0
            self.batches = self._epoch(self.epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "micro_index": self.micro_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.micro_index = int(state["epoch"]), int(state["micro_index"])
        self.batches = self._epoch(self.epoch)
        if not 0 <= self.micro_index < max(1, len(self.batches)):
            raise CheckpointError(f"saved position {self.micro_index} lies outside epoch {self.epoch}'s "
                                  f"{len(self.batches)} micro-batches: the data or batch settings changed")


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Model, optimizer, scaler, progress, batch stream and RNG of a run."""

    model: torch.nn.Module
    optimizer: Any  # pocketlm.optim.Optimizers
    scaler: torch.amp.GradScaler | None
    progress: Progress
    stream: BatchStream
    ema: Any = None
    """The weight average (``pocketlm.ema.WeightEMA``) with --ema-decay; its weights are saved
    beside the model's (``ema.safetensors``), its update count here."""
    KEYS = frozenset({"optimizer", "scaler", "progress", "rng"})
    """What ``state_dict`` holds."""

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights. ``progress`` keeps the on-disk layout of earlier versions
        (step, epoch, micro_index, tokens_seen, micro_splits in one mapping)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "progress": {**dataclasses.asdict(self.progress), **self.stream.state_dict()},
                "rng": capture_rng(),
                **({"ema_updates": torch.tensor(self.ema.updates)} if self.ema is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            progress = dict(state["progress"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.stream.load_state_dict(progress)
            kinds = {f.name: type(f.default) for f in dataclasses.fields(Progress)}
            self.progress = Progress(**{k: kinds[k](v) for k, v in progress.items() if k in kinds})
            restore_rng(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the training state does not fit this run ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
