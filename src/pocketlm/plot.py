"""``pocketlm plot``: training and validation loss, and the learning rate, against tokens seen.

Reads each run's ``metrics.jsonl`` (see metrics.py): step lines carry ``step``, ``loss``, ``lr``
and ``tokens_seen``; eval lines carry ``step`` and ``val_loss`` and are placed at the tokens seen
by their step (interpolated between logged steps). A resumed run may log a step twice (the steps
between its last checkpoint and a crash are trained again): the later line wins. Several runs share
one chart, each in its own colour, labelled by its folder's name.

Drawn with matplotlib's object-oriented API on the Agg canvas: no display, no pyplot state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pocketlm.errors import DataError
from pocketlm.metrics import METRICS_FILE


@dataclass
class Curves:
    """One run's curves, each sorted by step."""

    name: str
    path: Path
    steps: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    eval_steps: np.ndarray
    eval_tokens: np.ndarray
    val_loss: np.ndarray


def metrics_path(run: Path) -> Path:
    """A run folder's metrics.jsonl, or the file itself."""
    path = run / METRICS_FILE if run.is_dir() else run
    if not path.is_file():
        where = f"{run} has no {METRICS_FILE}" if run.is_dir() else f"{run} not found"
        raise DataError(f"{where}; pass a run folder (the --out-dir of pocketlm train) or its {METRICS_FILE}")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl. A last line cut short (the process died mid-write) is
    left out; any other line that is not a JSON object is damage, reported in one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a write cut short, not damage
                continue
            raise DataError(f"{path} is damaged: line {number} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} is damaged: line {number} is not a JSON object")
        records.append(record)
    return records


def _number(record: dict[str, Any], key: str) -> bool:
    value = record.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_curves(run: Path, name: str | None = None) -> Curves:
    """The curves of one run (a run folder or a metrics.jsonl); one-line ``DataError`` when there
    are none."""
    path = metrics_path(run)
    by_step: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    for record in read_records(path):
        event = record.get("event")
        if event == "step":
            if not all(_number(record, k) for k in ("step", "loss", "lr")):
                raise DataError(f"{path} is damaged: a step line lacks step, loss or lr")
            if not _number(record, "tokens_seen"):
                raise DataError(f"{path} has step lines without tokens_seen (written by an older pocketlm); "
                                "it cannot be drawn against tokens")
            by_step[int(record["step"])] = record  # a step logged again after a resume: the later line wins
        elif event == "eval" and _number(record, "step") and _number(record, "val_loss"):
            evals[int(record["step"])] = float(record["val_loss"])
    if not by_step:
        raise DataError(f"{path} holds no training steps yet" + (" (only evaluations)" if evals else ""))
    steps = np.array(sorted(by_step), dtype=np.int64)
    tokens = np.array([by_step[s]["tokens_seen"] for s in steps], dtype=np.float64)
    eval_steps = np.array(sorted(evals), dtype=np.int64)
    return Curves(name or (run.name if run.is_dir() else run.parent.name), path, steps, tokens,
                  np.array([by_step[s]["loss"] for s in steps], dtype=np.float64),
                  np.array([by_step[s]["lr"] for s in steps], dtype=np.float64),
                  eval_steps, tokens_at(eval_steps, steps, tokens),
                  np.array([evals[s] for s in eval_steps], dtype=np.float64))


def tokens_at(query: np.ndarray, steps: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Tokens seen after each step of ``query``: step 0 saw none; between logged steps linear; past
    the last logged step at the run's average tokens per step."""
    xs, ys = np.concatenate([[0], steps]), np.concatenate([[0.0], tokens])
    inside = np.interp(query, xs, ys)
    per_step = tokens[-1] / steps[-1] if steps[-1] > 0 else 0.0
    beyond = tokens[-1] + (query - steps[-1]) * per_step
    return np.where(query > steps[-1], beyond, inside)


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Folder names; where two runs share one, their parent folder too."""
    def name(run: Path, depth: int) -> str:
        folder = run if run.is_dir() else run.parent
        parts = folder.resolve().parts
        return "/".join(parts[-depth:])

    short = [name(r, 1) for r in runs]
    return [name(r, 2) if short.count(label) > 1 else label for r, label in zip(runs, short)]


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> list[Curves]:
    """Draw every run's curves into the image ``out`` (its suffix picks the format: .png, .svg,
    .pdf...). Returns the curves drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if not runs:
        raise DataError("give at least one run folder to plot")
    paths = [Path(r).expanduser() for r in runs]
    out = Path(out).expanduser()
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise DataError(f"--out {out}: unknown image format {out.suffix or '(no suffix)'}; use .png, .svg or .pdf")
    curves = [read_curves(p, label) for p, label in zip(paths, run_labels(paths))]
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for i, c in enumerate(curves):
        color = f"C{i % 10}"
        loss_ax.plot(c.tokens, c.loss, color=color, linewidth=1, alpha=0.75, label=f"{c.name}: training")
        if len(c.val_loss):
            loss_ax.plot(c.eval_tokens, c.val_loss, color=color, linestyle="--", marker="o", markersize=4,
                         label=f"{c.name}: validation")
        lr_ax.plot(c.tokens, c.lr, color=color, linewidth=1.2, label=c.name)
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.set_title("Training and validation loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize="small")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("tokens seen")
    lr_ax.xaxis.set_major_formatter(EngFormatter())
    lr_ax.grid(True, alpha=0.3)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise DataError(f"cannot write {out} ({exc.strerror or type(exc).__name__})") from None
    return curves
