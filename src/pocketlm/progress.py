"""What a training run prints while it runs, on a terminal or into a log file.

On a terminal a tqdm bar shows the step, the loss and tokens/s from the first step on, and says
what it is doing during long pauses ("evaluating", "compiling (about N s)"). Without a terminal
(stderr piped to a file, a batch job) the bar would draw nothing, so plain lines are printed
instead at a steady pace: ``step 40/900 | loss 6.1234 | 1,020 tok/s | ETA 14m05s``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm

PLAIN_LINE_SECONDS = 30.0  # a plain progress line at least this often...
PLAIN_LINE_STEPS = 100  # ...or every this many steps, whichever comes first


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressReporter:
    """``mode``: ``bar`` (tqdm), ``lines`` (plain progress lines) or ``off``."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", out: TextIO | None = None,
                 line_seconds: float = PLAIN_LINE_SECONDS, line_steps: int = PLAIN_LINE_STEPS) -> None:
        self.out = out or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.out, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.step_now = mode, total, initial
        self.line_seconds, self.line_steps = line_seconds, line_steps
        self.started = time.perf_counter()
        self.first_step = initial
        self.last_line_time, self.last_line_step = self.started, initial
        self.bar = (tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.out)
                    if mode == "bar" else None)

    def status(self, text: str) -> None:
        """What the run is doing right now (shown until the next step)."""
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
        elif self.mode == "lines":
            self.message(f"{text}...")

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        elif self.mode == "lines":
            print(text, file=self.out, flush=True)

    def eta_seconds(self) -> float | None:
        done = self.step_now - self.first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - self.step_now)

    def step(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, lr: float) -> None:
        self.step_now = step
        if self.bar is not None:
            self.bar.set_description_str("", refresh=False)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                 mfu=f"{mfu:.0%}" if mfu is not None else "?", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        if self.mode != "lines":
            return
        now = time.perf_counter()
        due = (now - self.last_line_time >= self.line_seconds or step - self.last_line_step >= self.line_steps
               or step == self.total or step == self.first_step + 1)
        if due:
            eta = self.eta_seconds()
            print(f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                  f"ETA {format_duration(eta) if eta is not None and math.isfinite(eta) else '?'}",
                  file=self.out, flush=True)
            self.last_line_time, self.last_line_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
