"""Benchmark the batch schedules ``bucket``, ``random`` and ``pack`` on a CPU.

For each model preset (``tiny`` with a 128-token context, ``gpt2-125m`` with 512) it measures:

* the padding fraction of a whole epoch of each schedule (exact: it is pure arithmetic on the
  example lengths, micro-batch size 4 as in the default ``TrainConfig``);
* training throughput: a fresh model (same seed for every schedule) runs ``--warmup`` untimed
  optimizer steps on the first micro-batches of epoch 0, then ``--steps`` timed steps on the next
  ones. Each step is ``collate`` + ``train_step`` over ``--grad-accum`` micro-batches (default 1,
  so one micro-batch per optimizer step). The schedules take turns step by step (one model per
  schedule in memory), so load from other processes on a shared machine falls on all alike. ``real_tokens_per_s`` counts only non-padding tokens;
  ``tokens_per_s`` counts every position the model computed.

The data is the whole of ``wiki.valid.raw`` (no validation hold-out), cut into examples the way
``pocketlm.data.load_dataset`` does. The result is one JSON object on stdout; ``--update-docs``
also rewrites the ``## Batching`` section of ``docs/benchmarks.md``.

    python benchmarks/batching.py                       # both presets, ~3-6 minutes on 2 cores
    python benchmarks/batching.py --presets tiny         # quick
    python benchmarks/batching.py --update-docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this script
from _common import exact_command, machine_info, update_docs
from pocketlm.batching import Batch, PaddingStats, collate, epoch_batches
from pocketlm.config import PRESETS, TrainConfig
from pocketlm.data import ExampleSet, make_examples, read_text, split_documents, tokenize_documents
from pocketlm.device import resolve_precision
from pocketlm.model import GPT
from pocketlm.tokenizer import gpt2_tokenizer
from pocketlm.train import build_optimizer, train_step

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
DOCS = REPO / "docs" / "benchmarks.md"
SCHEDULE_ORDER = ("bucket", "random", "pack")
# gpt2-125m takes seconds per micro-batch on a CPU; tiny takes a few hundredths of a second.
DEFAULT_STEPS = {"tiny": 20, "gpt2-125m": 3}
DEFAULT_WARMUP = {"tiny": 3, "gpt2-125m": 1}
TARGET_PADDING = 0.05  # bucket must waste less than this fraction of its tokens on padding...
WELL_UNDER = 0.5  # ...and at most this fraction of random's padding ("well under random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"text file to batch (default: {DEFAULT_DATA})")
    p.add_argument("--presets", default="tiny,gpt2-125m",
                   help="comma-separated model presets (default: tiny,gpt2-125m)")
    p.add_argument("--schedules", default=",".join(SCHEDULE_ORDER),
                   help="comma-separated schedules (default: bucket,random,pack)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps per preset and schedule "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items())})")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed optimizer steps before timing "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_WARMUP.items())})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size in sequences (default: 4)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast if the CPU has native bf16 (AMX/AVX512-BF16), else fp32")
    p.add_argument("--seed", type=int, default=1337, help="schedule order, init and dropout seed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-throughput", action="store_true", help="padding fractions only (no training)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time the schedules one after another instead of taking turns step by step "
                        "(one model in memory at a time instead of one per schedule)")
    p.add_argument("--update-docs", action="store_true",
                   help=f"rewrite the '## Batching' section of {DOCS.relative_to(REPO)}")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    for name in args.presets:
        if name not in PRESETS:
            p.error(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    for name in args.schedules:
        if name not in SCHEDULE_ORDER:
            p.error(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULE_ORDER)}")
    for name in ("steps", "grad_accum", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must not be negative")
    return args


# ---------------------------------------------------------------------------------------------
# Machine and command






def batching_machine_info(device: torch.device, precision: str) -> dict[str, Any]:
    return {**machine_info(device), "platform": platform.platform(), "precision": precision}


# ---------------------------------------------------------------------------------------------
# Data


def load_examples(path: Path, block_sizes: set[int]) -> tuple[dict[int, ExampleSet], dict[str, Any]]:
    """The whole file as training text: its documents tokenized into one stream, cut into examples
    of at most ``block_size`` predictions exactly as ``load_dataset`` cuts a split."""
    tokenizer = gpt2_tokenizer()
    docs = split_documents(read_text(path))
    stream = tokenize_documents(docs, tokenizer)
    info = {"path": str(path), "documents": len(docs), "stream_tokens": int(len(stream.tokens)),
            # predictions: every stream token but the first EOT; each example set holds all of them
            "train_tokens": int(np.diff(stream.doc_starts).sum())}
    return {bs: make_examples(stream, bs) for bs in sorted(block_sizes)}, info


def batch_stream(kind: str, lengths: np.ndarray, batch_size: int, block_size: int, seed: int) -> Iterator[Batch]:
    """Micro-batches in training order, epoch 0 first, continuing into later epochs if needed."""
    epoch = 0
    while True:
        yield from epoch_batches(kind, lengths, batch_size, block_size, seed, epoch)
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Measurements


def padding_row(examples: ExampleSet, kind: str, batch_size: int, block_size: int, seed: int) -> dict[str, Any]:
    batches = epoch_batches(kind, examples.lengths, batch_size, block_size, seed, 0)
    stats = PaddingStats.of(batches)
    rows = [len(b.rows) for b in batches]
    return {"padding_fraction": stats.padding_fraction, "real_tokens": stats.real_tokens,
            "padded_tokens": stats.padded_tokens, "micro_batches": len(batches),
            "distinct_shapes": len({(len(b.rows), b.seq_len) for b in batches}),
            "full_context_examples": float(np.mean(examples.lengths == block_size)),
            "rows_per_batch_max": max(rows), "seq_len_first_batch": batches[0].seq_len}


class ScheduleRun:
    """One schedule's training run: a fresh model and optimizer (same seed for every schedule)
    stepping through that schedule's micro-batches from the start of epoch 0.

    Each run keeps its own torch RNG state (dropout), so interleaving runs step by step gives
    every run the losses it would have had alone."""

    def __init__(self, examples: ExampleSet, preset: str, kind: str, args: argparse.Namespace,
                 device: torch.device, precision: str, pad_id: int) -> None:
        model_cfg = PRESETS[preset]
        self.kind = kind
        self.cfg = TrainConfig(preset=preset, batch_size=args.batch_size, grad_accum=args.grad_accum,
                               seed=args.seed, batching=kind)
        self.examples, self.device, self.precision, self.pad_id = examples, device, precision, pad_id
        torch.manual_seed(args.seed)
        self.model = GPT(model_cfg).to(device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.cfg, device)
        self.rng_state = torch.get_rng_state()
        self.batches = batch_stream(kind, examples.lengths, args.batch_size, model_cfg.block_size, args.seed)
        self.real = self.total = 0
        self.wall = self.cpu = 0.0
        self.step_seconds: list[float] = []
        self.step_real: list[int] = []
        self.step_tokens: list[int] = []
        self.losses: list[float] = []

    def step(self, timed: bool) -> None:
        """One optimizer step as the trainer takes it: collate the micro-batches, then train_step."""
        torch.set_rng_state(self.rng_state)
        cpu0, t0 = time.process_time(), time.perf_counter()
        group = [next(self.batches) for _ in range(self.cfg.grad_accum)]
        micro = [collate(self.examples, b, self.pad_id) for b in group]
        loss, _ = train_step(self.model, self.optimizer, micro, lr=self.cfg.lr, device=self.device,
                             precision=self.precision, grad_clip=self.cfg.grad_clip)
        loss_value = loss.item()  # synchronises (a no-op on a CPU)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        self.rng_state = torch.get_rng_state()
        if timed:
            self.real += sum(b.real_tokens for b in group)
            self.total += sum(len(b.rows) * b.seq_len for b in group)
            self.wall += wall
            self.cpu += cpu
            self.step_seconds.append(wall)
            self.step_real.append(sum(b.real_tokens for b in group))
            self.step_tokens.append(sum(len(b.rows) * b.seq_len for b in group))
            self.losses.append(loss_value)

    def summary(self, warmup: int) -> dict[str, Any]:
        steps = len(self.step_seconds)
        return {"steps_timed": steps, "warmup_steps": warmup, "micro_batches_timed": steps * self.cfg.grad_accum,
                "timed_real_tokens": self.real, "timed_tokens": self.total,
                "timed_padding_fraction": (self.total - self.real) / self.total if self.total else 0.0,
                "seconds": self.wall, "real_tokens_per_s": self.real / self.wall, "tokens_per_s": self.total / self.wall,
                # robust to a burst of outside load hitting one step
                "median_step_real_tokens_per_s": float(np.median(np.array(self.step_real) / np.array(self.step_seconds))),
                "step_seconds": [round(x, 4) for x in self.step_seconds],
                "step_tokens": self.step_tokens,
                # process CPU time / (wall * threads): well under 1 means the cores were busy elsewhere
                "cpu_utilisation": self.cpu / (self.wall * torch.get_num_threads()),
                "losses": [round(x, 4) for x in self.losses]}


def time_schedules(examples: ExampleSet, preset: str, kinds: list[str], args: argparse.Namespace,
                   device: torch.device, precision: str, pad_id: int, warmup: int,
                   steps: int) -> dict[str, dict[str, Any]]:
    """``warmup`` untimed steps, then ``steps`` timed ones, for every schedule. By default the
    schedules take turns step by step, so load from other processes on a shared machine falls on
    all of them alike; ``--no-interleave`` runs them one after another."""
    def run_all(runs: list[ScheduleRun]) -> None:
        for _ in range(warmup):
            for run in runs:
                run.step(timed=False)
        for i in range(steps):
            for run in runs:
                run.step(timed=True)
            print(f"[{preset}] timed step {i + 1}/{steps}: "
                  + ", ".join(f"{r.kind} {r.step_seconds[-1]:.2f} s" for r in runs),
                  file=sys.stderr, flush=True)

    if args.interleave:
        runs = [ScheduleRun(examples, preset, k, args, device, precision, pad_id) for k in kinds]
        run_all(runs)
        return {k: r.summary(warmup) for k, r in zip(kinds, runs)}
    out = {}
    for k in kinds:
        run = ScheduleRun(examples, preset, k, args, device, precision, pad_id)
        run_all([run])
        out[k] = run.summary(warmup)
        del run
    return out


# ---------------------------------------------------------------------------------------------
# Verdict and docs


def verdict(result: dict[str, Any]) -> tuple[bool, list[str]]:
    held, notes = True, []
    for preset, rows in result["results"].items():
        if "bucket" not in rows or "random" not in rows:
            continue
        b, r = rows["bucket"]["padding_fraction"], rows["random"]["padding_fraction"]
        ok = b < TARGET_PADDING and b <= WELL_UNDER * r
        held &= ok
        ratio = f"{r / b:.1f}x less than" if b > 0 else "none, against"
        notes.append(f"{preset} (context {rows['bucket']['block_size']}): bucket pads {b:.2%}, "
                     f"{ratio} random's {r:.2%}: {'held' if ok else 'MISSED'}")
    return held, notes


def spread(row: dict[str, Any]) -> float:
    """How much the seconds per computed token of one timed step varied within a schedule (max/min - 1)."""
    per_token = [s / t for s, t in zip(row["step_seconds"], row["step_tokens"])]
    return max(per_token) / min(per_token) - 1 if per_token else 0.0


def pct_range(values: list[float]) -> str:
    lo, hi = f"{min(values):.0%}", f"{max(values):.0%}"
    return lo if lo == hi else f"{lo}-{hi}"


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def docs_section(result: dict[str, Any]) -> str:
    m, a, d = result["machine"], result["settings"], result["data"]
    held, notes = verdict(result)
    timed = a["throughput"]
    lines = ["## Batching", "",
             f"Padding and CPU training throughput of the batch schedules on `{Path(d['path']).name}` "
             f"(the whole file as training text: {d['documents']} documents, {d['train_tokens']:,} predicted tokens), "
             f"micro-batches of {a['batch_size']} sequences at each preset's context length "
             "(128 for `tiny`, 512 for `gpt2-125m`).", "",
             f"- Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} "
             f"({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), {m['precision']} on {m['device']}.",
             f"- Date: {result['date']}.",
             f"- Command: `{result['command']}` ({result['runtime_s']:.0f} s in all).", ""]
    header = "| preset | schedule | padding (epoch) | real tokens | padded tokens | micro-batches |"
    rule = "|---|---|---:|---:|---:|---:|"
    if timed:
        header += " real tok/s | total tok/s | real tok/s, median step | timed steps | CPU share |"
        rule += "---:|---:|---:|---:|---:|"
    lines += [header, rule]
    for preset, rows in result["results"].items():
        for kind, row in rows.items():
            line = (f"| {preset} | {kind} | {row['padding_fraction']:.2%} | {row['real_tokens']:,} | "
                    f"{row['padded_tokens']:,} | {row['micro_batches']} |")
            if timed:
                line += (f" {fmt_rate(row['real_tokens_per_s'])} | {fmt_rate(row['tokens_per_s'])} | "
                         f"{fmt_rate(row['median_step_real_tokens_per_s'])} | "
                         f"{row['steps_timed']} (+{row['warmup_steps']} warm-up) | {row['cpu_utilisation']:.0%} |")
            lines.append(line)
    lines += ["", f"Padding is exact, over a whole epoch (epoch 0, seed {a['seed']})."]
    if timed:
        order = ("the schedules took turns step by step, so outside load fell on all of them alike"
                 if a["interleaved"] else "the schedules ran one after another")
        lines[-1] += (
            " Throughput: a fresh model per schedule (same seed), warm-up steps on the first micro-batches "
            "of epoch 0" + (" (so `bucket`'s first micro-batch, its longest, is never timed)" if all(
                row["warmup_steps"] > 0 for rows in result["results"].values() for row in rows.values()) else "")
            + ", then the timed steps on the next ones; "
            f"{order}. Each step is `collate` plus `train_step` over {a['grad_accum']} "
            f"micro-batch{'es' if a['grad_accum'] > 1 else ''}, AdamW update included. Real tok/s counts only "
            "non-padding tokens; total tok/s counts every computed position (both: tokens over the timed steps' "
            "summed wall time); the median-step column is the median over timed steps of that step's real "
            "tokens over its time, which one slow step under outside load does not move. CPU share is the process's CPU "
            "time over (wall time x threads) while timed. `pack` rows that hold several documents get a "
            "block-diagonal attention mask instead of the plain causal one.")
        if m["usable_cores"] and m["torch_threads"] < m["usable_cores"]:
            lines[-1] += (f" Torch ran {m['torch_threads']} thread{'s' if m['torch_threads'] > 1 else ''} on "
                          f"{m['usable_cores']} cores (`--threads`): on a shared machine, torch threads that wait "
                          "for a core another job holds slow every step several-fold, which fewer threads avoid.")
        full = [rows[k]["full_context_examples"] for rows in result["results"].values() for k in rows]
        if min(full) > 0.5:
            lines[-1] += (f" Here {pct_range(full)} of the examples fill the whole context (the "
                          "documents are long and are cut into context-length pieces), so most micro-batches of "
                          "every schedule are full and little throughput difference is expected from padding.")
        load = result["load_average"]
        util = [row["cpu_utilisation"] for rows in result["results"].values() for row in rows.values()]
        noise = max(spread(row) for rows in result["results"].values() for row in rows.values())
        lines += ["", f"Load: the 1-minute load average was {load['start']:.1f} at the start and {load['end']:.1f} "
                  f"at the end on {m['usable_cores']} cores"
                  + (" (the machine was shared with other jobs)" if max(load.values()) > 1.5 * (m["usable_cores"] or 1)
                     else "")
                  + f"; this process got {pct_range(util)} of its threads' CPU time while timed. "
                  + (("Other jobs took the rest in bursts, so in this run the tokens/s differences between "
                      "schedules, even large ones, come from outside load rather than from the schedules "
                      "(the JSON output lists every step's time); re-run on an idle machine to compare throughput. "
                      if min(util) < 0.85 else
                      f"Only a few steps are timed and the time per computed token of one step varied by up to "
                      f"{noise:.0%} within a schedule, so tokens/s differences between schedules smaller than "
                      "that are noise. ")
                     + "The padding columns do not depend on the machine.")]
    lines += ["", f"**Target** (`bucket` wastes under {TARGET_PADDING:.0%} of its tokens on padding, and at most "
              f"{WELL_UNDER:.0%} of what `random` wastes): **{'held' if held else 'not met'}**. "
              + "; ".join(notes) + ".", ""]
    return "\n".join(lines)






# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_file():
        print(f"error: data file not found: {args.data} (pass --data PATH)", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    pad_id = gpt2_tokenizer().eot_id

    example_sets, data_info = load_examples(args.data, {PRESETS[p].block_size for p in args.presets})
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for preset in args.presets:
        block_size = PRESETS[preset].block_size
        examples = example_sets[block_size]
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP.get(preset, 1)
        steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(preset, 3)
        results[preset] = {}
        for kind in args.schedules:
            row = {"block_size": block_size, "examples": len(examples)}
            row.update(padding_row(examples, kind, args.batch_size, block_size, args.seed))
            results[preset][kind] = row
        if not args.no_throughput:
            print(f"[{preset}] {warmup} warm-up + {steps} timed steps per schedule "
                  f"({'interleaved' if args.interleave else 'one schedule after another'})...",
                  file=sys.stderr, flush=True)
            timed = time_schedules(examples, preset, args.schedules, args, device, precision, pad_id, warmup, steps)
            for kind, row in timed.items():
                results[preset][kind].update(row)

    result = {
        "benchmark": "batching",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": exact_command(),
        "machine": batching_machine_info(device, precision),
        "settings": {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "seed": args.seed,
                     "precision": precision, "throughput": not args.no_throughput,
                     "interleaved": args.interleave},
        "data": data_info,
        "results": results,
    }
    held, notes = verdict(result)
    result["target"] = {"bucket_padding_under": TARGET_PADDING, "bucket_at_most_times_random": WELL_UNDER,
                        "held": held, "notes": notes}
    result["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    result["runtime_s"] = round(time.perf_counter() - began, 1)
    if args.update_docs:
        update_docs(docs_section(result), "## Batching")
        print(f"updated the '## Batching' section of {DOCS}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
