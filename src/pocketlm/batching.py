"""Length-based batch schedules: ``bucket`` (default), ``pack`` and ``random``.

A schedule turns example lengths into an epoch's list of micro-batches. It depends only on
``(seed, epoch)``, never on global RNG state, so a resumed run rebuilds the same epoch and
continues from a micro-batch index.

A micro-batch is rows of segments ``(example, begin, end)``: positions ``begin:end`` of one
example's inputs. ``bucket`` and ``random`` rows hold one whole example each; ``pack`` rows
concatenate several, cutting an example across rows where needed, so rows are exactly
``block_size`` long (the epoch's last row excepted) and nothing is padded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pocketlm.data import ExampleSet
from pocketlm.losses import IGNORE_INDEX

Segment = tuple[int, int, int]  # (example index, begin, end) over the example's inputs


@dataclass(frozen=True)
class Batch:
    rows: tuple[tuple[Segment, ...], ...]
    seq_len: int  # every row is padded (right side) to this length

    @property
    def real_tokens(self) -> int:
        return sum(end - begin for row in self.rows for _, begin, end in row)

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * self.seq_len - self.real_tokens


def padded_length(length: int, block_size: int, multiple: int = 8) -> int:
    """Round up to a multiple of 8 (friendlier matmul shapes, fewer distinct shapes), within the context."""
    return max(length, min(-(-length // multiple) * multiple, block_size))


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def bucket_batches(lengths: np.ndarray, batch_size: int, block_size: int, seed: int, epoch: int) -> list[Batch]:
    """Group examples of similar length under a token budget of ``batch_size * block_size``.

    Each micro-batch pads only to its own longest member (rounded up to 8), and short examples
    come in larger batches. The order is shuffled per epoch, with the longest batch first so an
    out-of-memory error shows at step 1.
    """
    rng = _rng(seed, epoch)
    budget = batch_size * block_size
    # Longest first; ties broken randomly so equal-length examples mix differently each epoch.
    order = np.lexsort((rng.random(len(lengths)), -np.asarray(lengths)))
    batches: list[Batch] = []
    rows: list[tuple[Segment, ...]] = []
    seq_len = 0
    for i in order:
        n = int(lengths[i])
        if not rows:
            seq_len = padded_length(n, block_size)
        elif (len(rows) + 1) * seq_len > budget:
            batches.append(Batch(tuple(rows), seq_len))
            rows, seq_len = [], padded_length(n, block_size)
        rows.append(((int(i), 0, n),))
    if rows:
        batches.append(Batch(tuple(rows), seq_len))
    if not batches:
        return batches
    longest = batches[0]
    rest = [batches[j] for j in rng.permutation(np.arange(1, len(batches)))]
    return [longest] + rest


def random_batches(lengths: np.ndarray, batch_size: int, block_size: int, seed: int, epoch: int) -> list[Batch]:
    """The baseline: fixed-size random batches, each padded to its longest member."""
    order = _rng(seed, epoch).permutation(len(lengths))
    batches = []
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        rows = tuple(((int(i), 0, int(lengths[i])),) for i in idx)
        batches.append(Batch(rows, int(max(lengths[i] for i in idx))))
    return batches


def pack_batches(lengths: np.ndarray, batch_size: int, block_size: int, seed: int, epoch: int) -> list[Batch]:
    """Concatenate shuffled examples into rows of exactly ``block_size`` tokens, no padding."""
    order = _rng(seed, epoch).permutation(len(lengths))
    rows: list[tuple[Segment, ...]] = []
    row: list[Segment] = []
    room = block_size
    for i in order:
        begin, n = 0, int(lengths[i])
        while begin < n:
            take = min(room, n - begin)
            row.append((int(i), begin, begin + take))
            begin += take
            room -= take
            if room == 0:
                rows.append(tuple(row))
                row, room = [], block_size
    batches = [Batch(tuple(rows[k:k + batch_size]), block_size) for k in range(0, len(rows), batch_size)]
    if row:  # the epoch's short last row rides alone, so no row is ever padded
        batches.append(Batch((tuple(row),), block_size - room))
    return batches


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Cut a micro-batch into up to ``parts`` smaller ones by rows (used after an out-of-memory
    error: the same examples, in more, smaller micro-batches)."""
    rows = batch.rows
    size = -(-len(rows) // parts)
    return [Batch(rows[k:k + size], batch.seq_len) for k in range(0, len(rows), size)]


SCHEDULES = {"bucket": bucket_batches, "pack": pack_batches, "random": random_batches}


def epoch_batches(kind: str, lengths: np.ndarray, batch_size: int, block_size: int,
                  seed: int, epoch: int) -> list[Batch]:
    return SCHEDULES[kind](np.asarray(lengths), batch_size, block_size, seed, epoch)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), IGNORE_INDEX on padding
    position_ids: torch.Tensor | None  # (B, T) when rows hold several segments
    segment_ids: torch.Tensor | None  # (B, T) when rows hold several segments
    real_tokens: int
    dropout_seed: int | None = None
    """Seeds torch's generator before this micro-batch's forward pass (see ``dropout_seed``)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MicroBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return MicroBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                          move(self.segment_ids), self.real_tokens, self.dropout_seed)

    def without_targets(self) -> "MicroBatch":
        """The same inputs with nothing to predict: a rank with no micro-batch in a step (an
        epoch's short last step) runs this to take part in the gradient reduction, adding zero."""
        return dataclasses.replace(self, targets=torch.full_like(self.targets, IGNORE_INDEX), real_tokens=0)


def dropout_seed(run_seed: int, step: int, index: int, piece: int = 0) -> int:
    """The seed of a micro-batch's dropout masks: a function of the run's seed, the optimizer
    step, the micro-batch's place in that step and its piece after an out-of-memory split. Never
    of which rank runs it or of what ran before, so one process and N processes draw the same
    masks, and a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([run_seed, step, index, piece]).generate_state(1, np.uint64)[0] >> 1)


def collate(examples: ExampleSet, batch: Batch, pad_id: int) -> MicroBatch:
    """Build right-padded tensors. Right padding plus the causal mask keeps real tokens from
    ever attending to padding; packed rows also get segment ids for a block-diagonal mask."""
    B, T = len(batch.rows), batch.seq_len
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    packed = any(len(row) > 1 for row in batch.rows)
    positions = np.zeros((B, T), dtype=np.int64) if packed else None
    segments = np.full((B, T), -1, dtype=np.int64) if packed else None
    for r, row in enumerate(batch.rows):
        col = 0
        for s, (ex, begin, end) in enumerate(row):
            x, y = examples.inputs_targets(ex)
            n = end - begin
            input_ids[r, col:col + n] = x[begin:end]
            targets[r, col:col + n] = y[begin:end]
            if packed:
                positions[r, col:col + n] = np.arange(n)
                segments[r, col:col + n] = s
            col += n
    as_tensor = torch.from_numpy
    return MicroBatch(as_tensor(input_ids), as_tensor(targets),
                      None if positions is None else as_tensor(positions),
                      None if segments is None else as_tensor(segments),
                      batch.real_tokens)


@dataclass
class PaddingStats:
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def padding_fraction(self) -> float:
        total = self.real_tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    @classmethod
    def of(cls, batches: Sequence[Batch]) -> "PaddingStats":
        return cls(sum(b.real_tokens for b in batches), sum(b.padded_tokens for b in batches))
