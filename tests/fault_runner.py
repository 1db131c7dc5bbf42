"""Run ``pocketlm`` in a real process that kills itself with SIGKILL at a chosen point.

    python tests/fault_runner.py POINT N pocketlm-args...

POINT names where the process dies, on the N-th time it gets there:

- ``mid-step``: inside an optimizer step, after a micro-batch's forward pass;
- ``mid-eval``: inside a validation pass;
- ``weights-written``: mid-save, after model.safetensors is in the temporary folder;
- ``state-written``: mid-save, after state.pt is in the temporary folder;
- ``before-rename``: mid-save, every file written and fsynced, the folder not yet renamed;
- ``before-prune``: the new checkpoint in place, older ones not yet pruned.

``none`` arms nothing. SIGKILL cannot be caught, so this is what a power cut or the OOM killer
does at that moment. The machine probe's matmul timing is replaced by conftest.py's fixed
figure, as in the test process: these runs test recovery, not speed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import torch

from pocketlm import checkpoint, cli, losses, plan, train


def die_on_nth_call(owner: Any, name: str, n: int, *, after: bool) -> None:
    real: Callable[..., Any] = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if not after and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if after and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def fix_machine_peak() -> None:
    from conftest import FIXED_PEAK  # tests/, beside this script

    plan.device_peak_flops = lambda device, precision: FIXED_PEAK


POINTS: dict[str, Callable[[int], None]] = {
    "none": lambda n: None,
    "mid-step": lambda n: die_on_nth_call(losses.NextTokenLoss, "forward", n, after=True),
    "mid-eval": lambda n: die_on_nth_call(train, "evaluate_nll", n, after=False),
    "weights-written": lambda n: die_on_nth_call(checkpoint, "save_file", n, after=True),
    "state-written": lambda n: die_on_nth_call(torch, "save", n, after=True),
    "before-rename": lambda n: die_on_nth_call(checkpoint.os, "rename", n, after=False),
    "before-prune": lambda n: die_on_nth_call(checkpoint, "_prune", n, after=False),
}

if __name__ == "__main__":
    point, nth, *args = sys.argv[1:]
    fix_machine_peak()
    POINTS[point](int(nth))
    sys.exit(cli.main(args))
