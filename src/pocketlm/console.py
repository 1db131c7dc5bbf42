"""The terminal side of ``pocketlm generate``: where prompts come from and how streamed text is printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable, TextIO

from pocketlm.errors import ConfigError

DEFAULT_PROMPT = "The history of"


class OrderedPrinter:
    """Prints samples one after another while they are generated side by side in a batch.

    The lowest-numbered unfinished sample streams live; text of later samples is buffered and
    printed as soon as their turn comes. ``header(row)`` (optional) is printed before each sample,
    ``footer(row)`` after it. An instance is a ``stream`` callback for ``Generator.generate``.
    """

    def __init__(self, n_rows: int, out: TextIO | None = None, header: Callable[[int], str] | None = None,
                 footer: Callable[[int], str] | None = None) -> None:
        self.out = out or sys.stdout
        self.n_rows = n_rows
        self.header = header
        self.footer = footer
        self.buffers = [""] * n_rows
        self.finished = [False] * n_rows
        self.current = 0
        self.started = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _start_current(self) -> None:
        if not self.started and self.current < self.n_rows:
            self.started = True
            if self.header is not None:
                self._write(self.header(self.current))

    def __call__(self, row: int, text: str, finished: bool) -> None:
        self.buffers[row] += text
        self.finished[row] |= finished
        self._start_current()
        while self.current < self.n_rows:
            self._write(self.buffers[self.current])
            self.buffers[self.current] = ""
            if not self.finished[self.current]:
                break
            if self.footer is not None:
                self._write(self.footer(self.current))
            self.current += 1
            self.started = False
            self._start_current()


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file, one per line; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"prompt file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def iter_interactive(read: Callable[[str], str] | None = None) -> Iterable[str]:
    """Prompts typed at a terminal until EOF (Ctrl-D) or ``exit``/``quit``."""
    read = read or input
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line
