"""Several processes, one run: torchrun's environment, the process group and the few collectives
the trainer needs.

``torchrun --nproc-per-node N -m pocketlm train ...`` starts N copies of the trainer with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``Ranks.from_env`` reads them (none set: a
single process, exactly as without torchrun). Each rank takes its share of every optimizer
step's micro-batches from the same deterministic schedule (``Ranks.share``): micro-batch ``i``
of a step goes to rank ``i mod N``, so the global batch is the same whatever N is. Rank 0 logs
and saves; every rank loads the same checkpoint.

The control messages between ranks (the plan rank 0 decided, whether the ranks agree on their
settings, whether any rank caught a signal, whether rank 0's save worked) are small CPU tensors,
sent over gloo even beside NCCL (``cpu:gloo,cuda:nccl``): no pickles cross between processes.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from pocketlm.errors import ConfigError, TrainingError

T = TypeVar("T")
ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a rank waits for the others at a collective before giving up. A rank that dies is
# normally noticed at once (its connections close, and torchrun stops the rest); this bounds
# the wait when a rank hangs instead.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Ranks":
        """torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a single process when none is set."""
        env = os.environ if env is None else env
        given = {name: env.get(name) for name in ENV_NAMES}
        if all(v is None for v in given.values()):
            return cls()
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"{', '.join(missing)} not set beside {', '.join(n for n in ENV_NAMES if n not in missing)}:"
                              " launch several processes with torchrun, which sets all three")
        try:
            rank, world, local = (int(given[name]) for name in ENV_NAMES)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers; got "
                              f"{given['RANK']!r}, {given['WORLD_SIZE']!r}, {given['LOCAL_RANK']!r}") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ConfigError(f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local} do not fit together "
                              "(need 0 <= RANK < WORLD_SIZE)")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, group: Sequence[T]) -> list[tuple[int, T]]:
        """This rank's items of ``group``, with their index in it: items ``rank, rank + N, ...``.
        Strided rather than in blocks, so a short group (an epoch's last step) is spread evenly."""
        return [(i, item) for i, item in enumerate(group) if i % self.world_size == self.rank]

    # -----------------------------------------------------------------------------------------
    # Collectives (no-ops in a single process)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (returned; the input is left alone)."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def total(self, count: int) -> int:
        """The sum over ranks of a whole number."""
        if not self.distributed:
            return count
        return int(self.sum(torch.tensor([count], dtype=torch.int64)).item())

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        if not self.distributed:
            return flag
        return self.total(int(flag)) > 0

    def gather_flags(self, flag: bool) -> list[bool]:
        """Every rank's ``flag``, by rank."""
        if not self.distributed:
            return [flag]
        out = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(out, torch.tensor([int(flag)]))
        return [bool(t.item()) for t in out]

    def broadcast_text(self, text: str) -> str:
        """Rank 0's ``text`` on every rank (UTF-8 bytes in a tensor: nothing is unpickled)."""
        if not self.distributed:
            return text
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dist.broadcast(size, src=0)
        if not self.is_main:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0)
        return bytes(data.tolist()).decode("utf-8")

    def broadcast_json(self, value: Any) -> Any:
        return json.loads(self.broadcast_text(json.dumps(value, sort_keys=True)))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_same(self, items: Mapping[str, Any]) -> None:
        """One-line error on every rank unless every rank holds the same ``items`` (JSON-able
        values by name: the settings, the data, the checkpoint being resumed) as rank 0."""
        if not self.distributed:
            return
        mine = json.loads(json.dumps(dict(items), sort_keys=True, default=str))
        theirs = self.broadcast_json(mine)
        differ = [name for name in mine if mine[name] != theirs.get(name)]
        bad = [r for r, flag in enumerate(self.gather_flags(bool(differ))) if flag]
        if differ:
            details = "; ".join(_difference(name, mine[name], theirs.get(name)) for name in differ)
            raise ConfigError(f"rank {self.rank} differs from rank 0: {details}; start every rank with the same "
                              "command, data and run folder")
        if bad:
            raise ConfigError(f"rank(s) {', '.join(map(str, bad))} differ from rank 0 (their message says how); "
                              "start every rank with the same command, data and run folder")

    def on_main(self, what: str, work: Callable[[], T]) -> T | None:
        """``work()`` on rank 0 (None elsewhere), and every rank told whether it worked: when it
        fails, the other ranks stop with one line instead of waiting for a rank that has left."""
        if not self.distributed:
            return work()
        failed: BaseException | None = None
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException as exc:  # re-raised below, once the others know
                failed = exc
        if self.any(failed is not None) and failed is None:
            raise TrainingError(f"rank 0 failed to {what} (its message says why); rank {self.rank} stopped with it")
        if failed is not None:
            raise failed
        return result


def _difference(name: str, mine: Any, theirs: Any) -> str:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
        shown = ", ".join(f"{k} {mine.get(k)!r} here, {theirs.get(k)!r} on rank 0" for k in keys[:3])
        return f"{name} ({shown})"
    return f"{name} ({mine!r} here, {theirs!r} on rank 0)"


def backend_for(device_type: str) -> str:
    """NCCL for CUDA tensors, with gloo beside it for the CPU's control messages; gloo on a CPU."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(ranks: Ranks, device_type: str) -> Iterator[Ranks]:
    """The default process group for the life of the ``with`` (nothing in a single process, or
    when the caller already made one). On CUDA each rank takes the GPU of its ``LOCAL_RANK``."""
    if not ranks.distributed or dist.is_initialized():
        yield ranks
        return
    if device_type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {ranks.local_rank} but this machine has {torch.cuda.device_count()} GPU(s):"
                              " give torchrun --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend_for(device_type), rank=ranks.rank, world_size=ranks.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield ranks
        dist.barrier()  # no rank tears down its connections while another still uses them
    finally:
        dist.destroy_process_group()


def check_split(grad_accum: int, batch_size: int, world_size: int) -> None:
    """One-line error unless each optimizer step's micro-batches split evenly across the ranks."""
    if grad_accum % world_size == 0:
        return
    sequences = batch_size * grad_accum
    fits = [(b, sequences // b) for b in range(batch_size, 0, -1)
            if sequences % b == 0 and (sequences // b) % world_size == 0]
    hint = (f"--batch-size {fits[0][0]} --grad-accum {fits[0][1]} keeps the global batch of {sequences} sequences"
            if fits else f"no split of {sequences} sequences per step fits {world_size} ranks; change --grad-accum")
    raise ConfigError(f"--grad-accum {grad_accum} micro-batches per step cannot be split evenly across "
                      f"{world_size} ranks (each rank takes grad_accum / ranks of them): {hint}")
