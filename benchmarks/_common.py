"""What every benchmark script shares: the machine, one timer, targets as data, and the report
writer that turns a result into its section of docs/benchmarks.md.

A script's result is one JSON object with ``benchmark``, ``date``, ``command``, ``machine``,
``load_average`` (before/after), ``runtime_s``, its own measurements and ``targets`` (each goal
with its value and whether it was met). ``render_section`` writes the prose header from those
common keys, then the script's tables and notes; ``update_docs`` replaces only that section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocketlm.device import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
DOCS_INTRO = "# Benchmarks\n\nMeasurements of pocketlm, each section written by a script in `benchmarks/`.\n"
GIB = 1024 ** 3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        hf_version = None
    info = {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "transformers": hf_version,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "cpu_native_bf16": cpu_has_native_bf16()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def exact_command(script: str, argv: Sequence[str] | None) -> str:
    """The command as typed from the repository root (the arguments ``main`` was given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


class Stopwatch:
    """Wall time and load average since the script began, and a progress line writer (stderr)."""

    def __init__(self, name: str) -> None:
        self.name, self.began, self.load_before = name, time.perf_counter(), os.getloadavg()[0]

    def say(self, message: str) -> None:
        print(f"[{self.name} {time.perf_counter() - self.began:5.0f}s] {message}", file=sys.stderr, flush=True)

    def envelope(self, script: str, argv: Sequence[str] | None, device: torch.device | str = "cpu",
                 **body: Any) -> dict[str, Any]:
        """The keys every result carries, then the script's own."""
        return {"benchmark": self.name, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": exact_command(script, argv), "machine": machine_info(device),
                "load_average": {"before": round(self.load_before, 2), "after": round(os.getloadavg()[0], 2)},
                "runtime_s": round(time.perf_counter() - self.began, 1), **body}


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(*fns: Callable[[], Any], repeats: int, warmup: int = 1, device: Any = None) -> float:
    """Best time of ``repeats`` rounds of calling every ``fn`` in turn, after ``warmup`` untimed
    rounds (oneDNN's first calls, compilation). On a CUDA ``device`` each round is synchronised."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def steps_in_turns(steppers: dict[str, Callable[[int], Any]], *, rounds: int, warmup: int, seed: int,
                   device: Any = None, say: Callable[[str], None] | None = None) -> dict[str, dict[str, list]]:
    """Round ``r`` calls ``stepper(r)`` (an optimizer step returning its loss, a decoder returning
    its tokens...) of every entry, the order rotating each round so that outside load falls on all
    alike. Each round reseeds torch, so every entry draws the same dropout masks as it would alone.
    Returns per entry the wall and CPU seconds of the timed rounds, the warm-up rounds' seconds and
    what every round returned."""
    names = list(steppers)
    log = {name: {"warmup_step_s": [], "step_s": [], "cpu_s": [], "outputs": []} for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            torch.manual_seed(seed + r)
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = steppers[name](r)
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            entry = log[name]
            entry["outputs"].append(out)
            if r < warmup:
                entry["warmup_step_s"].append(round(wall, 4))
            else:
                entry["step_s"].append(round(wall, 4))
                entry["cpu_s"].append(cpu)
            if say:
                loss = f", loss {out:.4f}" if isinstance(out, float) else ""
                say(f"round {r + 1}/{rounds}{' (warm-up)' if r < warmup else ''} {name}: {wall:.2f} s{loss}")
    return log


def step_summary(log: dict[str, list], tokens_per_step: int) -> dict[str, Any]:
    """Median step, tokens/s from it, the process's share of its threads' CPU time, and the
    extra time of the warm-up steps over as many steady ones (compilation, first calls)."""
    median = statistics.median(log["step_s"])
    warm = log["warmup_step_s"]
    return {"median_step_s": round(median, 4), "tokens_per_s": round(tokens_per_step / median, 1),
            "cpu_share": round(sum(log["cpu_s"]) / (sum(log["step_s"]) * torch.get_num_threads()), 3),
            "first_steps_extra_s": round(sum(warm) - len(warm) * median, 2),
            "step_s": log["step_s"], "warmup_step_s": warm, "losses": [round(x, 5) for x in log["outputs"]]}


@dataclass(frozen=True)
class Target:
    """A goal: ``value >= bound`` (or ``<=`` with ``at_most``); ``fmt`` shows the value."""

    goal: str
    bound: float
    at_most: bool = False
    fmt: str = "{:.3g}"

    def judge(self, value: float | None) -> dict[str, Any]:
        met = None if value is None else bool(value <= self.bound if self.at_most else value >= self.bound)
        return {"goal": self.goal, "bound": self.bound, "at_most": self.at_most, "value": value, "met": met,
                "shown": "n/a" if value is None else self.fmt.format(value)}


def judge(targets: dict[str, Target], values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Every target with its value (None: not measured in this run) and whether it was met."""
    return {key: target.judge(values.get(key)) for key, target in targets.items()}


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    """A paragraph printed above the table."""


_NUMBER = re.compile(r"^\(?\**[-+]?[\d,]*\.?\d+(%|x| s| ms| GiB)?\**\)?$")


def render_table(table: Table) -> str:
    """A Markdown table; columns whose cells all look like numbers are right-aligned."""
    cells = [[str(c) for c in row] for row in table.rows]
    numeric = [bool(cells) and all(_NUMBER.match(row[i]) or row[i] in ("", "n/a") for row in cells)
               for i in range(len(table.header))]
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def render_section(result: dict[str, Any], heading: str, summary: str, tables: Sequence[Table] = (),
                   notes: Sequence[str] = (), method: str = "") -> str:
    """``heading``, a short summary, the machine/date/load/command lines, the tables, the targets,
    notes and a short method paragraph."""
    m, load = result["machine"], result["load_average"]
    bf16 = {True: " with native bf16", False: " without native bf16"}.get(m.get("cpu_native_bf16"), "")
    machine = (f"{m['cpu']}{bf16}, {m['usable_cores']} usable of {m['logical_cores']} cores, "
               f"{m['torch_threads']} torch thread(s); torch {m['torch']}, transformers {m['transformers']}, "
               f"Python {m['python']}; "
               f"device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""))
    parts = [heading, summary.strip(), "\n".join([
        f"- Machine: {machine}.", f"- Date: {result['date']}.",
        f"- Load average (1 min): {load['before']} before, {load['after']} after.",
        f"- Command: `{result['command']}` ({result['runtime_s']:.0f} s in all)."])]
    for table in tables:
        parts += ([table.caption.strip()] if table.caption else []) + [render_table(table)]
    targets = result.get("targets") or {}
    if targets:
        verdict = {None: "not measured", True: "**met**", False: "**not met**"}
        parts.append("Targets:\n\n" + "\n".join(f"- {t['goal']}: {t['shown']}, {verdict[t['met']]}."
                                                for t in targets.values()))
    parts += [n.strip() for n in notes if n] + ([f"Method: {method.strip()}"] if method else [])
    return "\n\n".join(parts) + "\n"


def replace_section(text: str, section: str, heading: str) -> str:
    """Replace ``heading``'s section (up to the next ``## `` heading outside code fences) with
    ``section``; append it when missing."""
    lines = text.splitlines(keepends=True)
    start = end = None
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and start is None and line.rstrip() == heading:
            start = i
        elif not fenced and start is not None and line.startswith("## "):
            end = i
            break
    body = section.rstrip("\n") + "\n"
    if start is None:
        prefix = text.rstrip("\n")
        return (prefix + "\n\n" if prefix else "") + body
    tail = lines[end:] if end is not None else []
    return "".join(lines[:start]) + body + ("\n" if tail else "") + "".join(tail)


def update_docs(section: str, heading: str, path: Path = DOCS) -> None:
    """Rewrite one section of the benchmarks page atomically; the other sections stay as they are."""
    from pocketlm.rundir import write_atomically

    text = path.read_text(encoding="utf-8") if path.is_file() else DOCS_INTRO
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, replace_section(text, section, heading))


def add_training_options(parser: argparse.ArgumentParser, precision: str, seed: int = 1337) -> None:
    """--seed, --precision and --data (default the shared WikiText-2 validation text) of a script
    that trains."""
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--precision", default=precision)
    parser.add_argument("--data", type=Path, default=WIKI_VALID)


def add_common_options(parser: argparse.ArgumentParser, heading: str, threads: str = "torch's own") -> None:
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (default: {threads})")
    parser.add_argument("--update-docs", action="store_true", help=f"rewrite the '{heading}' section of the docs")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the benchmarks page (default docs/benchmarks.md)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON result here")


def script_main(argv: list[str] | None, parse_args: Callable[[list[str] | None], argparse.Namespace],
                run: Callable[[argparse.Namespace, list[str] | None], dict[str, Any]], heading: str,
                section: Callable[[dict[str, Any]], str]) -> int:
    """Parse, set the torch threads, run; print the result as JSON (also to ``--json-out``) and
    with ``--update-docs`` rewrite the script's section."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return emit(run(args, argv), args, heading, section)


def entry_point(parse_args: Callable[[list[str] | None], argparse.Namespace],
                run: Callable[[argparse.Namespace, list[str] | None], dict[str, Any]], heading: str,
                section: Callable[[dict[str, Any]], str]) -> Callable[[list[str] | None], int]:
    """A script's ``main(argv=None)``: ``script_main`` with the script's own pieces."""
    def main(argv: list[str] | None = None) -> int:
        return script_main(argv, parse_args, run, heading, section)

    return main


def emit(result: dict[str, Any], args: argparse.Namespace, heading: str,
         section: Callable[[dict[str, Any]], str]) -> int:
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    if args.update_docs:
        update_docs(section(result), heading, args.docs)
    print(text)
    return 0
